"""Exact top-k over a Cartesian product of sub-key sets (product-key retrieval, PEER §2).

An expert is a coordinate tuple ``(c_0, ..., c_{P-1})`` with ``c_p < n_p``; its flat id is row-major,
``((c_0 * n_1 + c_1) * n_2 + c_2) ...``, and its score is the sum of its coordinates' sub-key scores.
The top-k over all ``prod(n_p)`` experts is found by merging two sets at a time and pruning to k after
each merge, so the cost is ``O(P * k^2)`` candidates per row, never ``k^P``.

Why pruning is exact: order candidates by (score descending, flat id ascending). If a tuple is in the
top-k of the product, each prefix of it is in the top-k of its own partial product: any prefix that
beats it, extended by the same suffix, gives a tuple with a score at least as high and (row-major ids
preserve the prefix order) a lower id on a tie, so k better prefixes would mean k better tuples.

Ties: equal scores are broken by the lower flat id, exactly, at every stage. Sums are formed left to
right, ``((s_0 + s_1) + s_2) + ...``, so a brute force summing in the same order agrees bit for bit.
Rounding keeps the argument's "at least as high" (a >= b implies a + c >= b + c in floating point);
the one gap is a strictly better prefix whose extended sum rounds to a tie and loses on id, an
order-of-one-ulp event. Scores that add exactly (e.g. small integers) never round.

Shape legend: R leading dims (any), n sub-keys of one part, k kept candidates, C candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llm.ops.peer_reference import autocast_off
from llm.ops.triton_peer_routing import (
    MAX_FLAT_ID,
    merge_topk,
    segment_rows_triton,
    stacked_rows_triton,
    weighted_gather_triton,
)
from llm.ops.triton_retrieval import fused_retrieval, fused_retrieval_applies
from llm.ops.triton_topk import kernel_applies, topk, topk_positions, topk_positions_reference

# Two-part retrieval on CUDA runs as fused kernels (scores and per-part top-k in one, the merge over the
# pairs that can reach the top k in a second; see llm/ops/triton_retrieval.py): 0.57 vs 1.29 ms for the
# unfused kernels at the paper's size on an H100 (benchmarks/RESULTS.md). Benchmarks turn it off to compare.
FUSED_RETRIEVAL = True


def _select(scores_RC: Tensor, ids_RC: Tensor | None, k: int, use_kernels: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k of candidates listed in ascending-id order; ties go to the lower id.

    ``ids_RC=None`` means the ids are ``arange(C)``. Returns (scores, ids), each (..., k), sorted by
    (score descending, id ascending). ``topk_positions`` breaks ties by the lowest position (= lowest id):
    a stable sort on CPU, a register top-k kernel on CUDA; ``torch.topk`` documents no tie order.
    """
    order_Rk = topk_positions(scores_RC, k) if use_kernels else topk_positions_reference(scores_RC, k)
    ids_Rk = order_Rk if ids_RC is None else ids_RC.gather(-1, order_Rk)
    return scores_RC.gather(-1, order_Rk), ids_Rk


def _sort_by_id(scores_Rk: Tensor, ids_Rk: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder kept candidates by ascending id (ids are unique) so a merge grid comes out in id order."""
    ids_sorted, perm = ids_Rk.sort(dim=-1)
    return scores_Rk.gather(-1, perm), ids_sorted


def product_topk(part_scores: Sequence[Tensor], k: int, use_kernels: bool = True) -> tuple[Tensor, Tensor]:
    """Exact top-k over the Cartesian product of P sub-key score sets.

    Args:
        part_scores: P tensors, part p of shape (..., n_p), same leading dims and dtype.
        k: experts to keep, ``1 <= k <= prod(n_p)``. A part with ``n_p < k`` keeps all of its sub-keys.
        use_kernels: False keeps every step in PyTorch (no Triton top-k or merge kernels on CUDA).

    Returns:
        scores (..., k): sums of the chosen coordinates' sub-key scores (differentiable w.r.t. every
        part), sorted descending, ties by lower flat id; ids (..., k) int64 row-major flat ids.
    """
    if not part_scores:
        raise ValueError("product_topk: part_scores is empty; pass one tensor per sub-key set")
    sizes = [s.shape[-1] for s in part_scores]
    total = 1
    for n in sizes:
        total *= n
    if not 1 <= k <= total:
        raise ValueError(f"product_topk: k={k} must be in [1, prod({sizes})={total}]")

    fits_kernels = use_kernels and all(p.dtype == torch.float32 and kernel_applies(p) for p in part_scores)
    if fits_kernels and total <= MAX_FLAT_ID + 1:
        return _product_topk_kernels(part_scores, sizes, k)
    scores_Rk, ids_Rk = _select(part_scores[0], None, min(k, sizes[0]), use_kernels)
    for part, n_p in zip(part_scores[1:], sizes[1:], strict=True):
        # Prune the new part on its own first: only its top-k sub-keys can appear in the product's top-k.
        part_Rk, part_ids_Rk = _sort_by_id(*_select(part, None, min(k, n_p), use_kernels))
        scores_Rk, ids_Rk = _sort_by_id(scores_Rk, ids_Rk)
        # (..., a, b) grid of sums; row-major over (a, b) lists candidates in ascending flat id.
        cand_Rab = scores_Rk.unsqueeze(-1) + part_Rk.unsqueeze(-2)
        cand_ids_Rab = ids_Rk.unsqueeze(-1) * n_p + part_ids_Rk.unsqueeze(-2)
        num_cand = cand_Rab.shape[-1] * cand_Rab.shape[-2]
        scores_Rk, ids_Rk = _select(cand_Rab.flatten(-2), cand_ids_Rab.flatten(-2), min(k, num_cand), use_kernels)
    return scores_Rk, ids_Rk


def _product_topk_kernels(part_scores: Sequence[Tensor], sizes: list[int], k: int) -> tuple[Tensor, Tensor]:
    """``product_topk`` with the Triton kernels (CUDA, fp32): per-part top-k, then register merges.

    The kernels return values without a graph; where a part needs a gradient the scores are re-formed by
    gathering each coordinate's sub-key score and summing left to right, the kernels' own order, so the
    values are the same bits (up to the sign of a zero).
    """
    scores_Rk, ids_Rk = topk(part_scores[0], min(k, sizes[0]))
    num_ids = sizes[0]
    for part, n_p in zip(part_scores[1:], sizes[1:], strict=True):
        part_Rk, pos_Rk = topk(part, min(k, n_p))
        num_ids *= n_p
        kept = min(k, scores_Rk.shape[-1] * part_Rk.shape[-1])
        scores_Rk, ids_Rk = merge_topk(scores_Rk, ids_Rk, part_Rk, pos_Rk, n_p, kept, num_ids)
    if torch.is_grad_enabled() and any(p.requires_grad for p in part_scores):
        scores_Rk = gather_scores(part_scores, unravel_ids(ids_Rk, sizes))
    return scores_Rk, ids_Rk


def unravel_ids(ids: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Row-major flat ids (...) -> P coordinate tensors (...), coordinate p in [0, sizes[p])."""
    coords = []
    for n_p in reversed(sizes[1:]):
        coords.append(ids % n_p)
        ids = ids // n_p
    coords.append(ids)  # ids < prod(sizes), so what is left is the first coordinate
    return coords[::-1]


def gather_scores(part_scores: Sequence[Tensor], coords: Sequence[Tensor]) -> Tensor:
    """sum_p part_scores[p][..., coords[p]], summed left to right: parts (..., n_p), coords (..., k)."""
    total = part_scores[0].gather(-1, coords[0])
    for part, c in zip(part_scores[1:], coords[1:], strict=True):
        total = total + part.gather(-1, c)
    return total


def subkey_scores_from_queries(q_THQ: Tensor, sub_keys: Sequence[Tensor]) -> list[Tensor]:
    """Queries (T, H, P*q) and P sub-key sets ((n_p, q) shared or (H, n_p, q) per head) -> P x (T, H, n_p).

    Computed in the queries' dtype with autocast off (PEER keeps retrieval scores in >= fp32).
    """
    q = sub_keys[0].shape[-1]
    scores = []
    with autocast_off(q_THQ.device.type):
        for q_THq, keys in zip(q_THQ.split(q, dim=-1), sub_keys, strict=True):
            if keys.dim() == 2:  # shared by heads: (n, q)
                scores.append(torch.einsum("thq,nq->thn", q_THq, keys))
            else:  # one set per head: (H, n, q)
                scores.append(torch.einsum("thq,hnq->thn", q_THq, keys))
    return scores


class _ProductKeyRetrieval(torch.autograd.Function):
    """scores, ids = top-k over the product of the queries' sub-key scores, with a row-sparse backward.

    Autograd through ``product_topk`` would keep the dense (T, H, n_p) scores of every part and send a
    dense gradient of that size back through the score einsums. The selected score is
    ``sum_p q_p . key_p[c_p]``, so only the K selected sub-keys per part and row carry gradient:
    ``dq_p = sum_k dscore_k key_p[c_pk]`` is an ``embedding_bag`` with per-sample weights, and
    ``dkey_p`` is that embedding_bag's table gradient for the output gradient q_p. Where the top-k
    kernels run (CUDA, fp32) both are Triton kernels instead (``weighted_gather_triton``,
    ``segment_rows_triton``: sorted segments, no atomics, no host sync); elsewhere embedding_bag.
    """

    @staticmethod
    def forward(ctx, k: int, use_kernels: bool, q_THQ: Tensor, *sub_keys: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if use_kernels and FUSED_RETRIEVAL and fused_retrieval_applies(q_THQ, sub_keys, k):
                scores_THK, ids_THK = fused_retrieval(q_THQ, sub_keys, k)
            else:
                parts = subkey_scores_from_queries(q_THQ, sub_keys)
                scores_THK, ids_THK = product_topk(parts, k, use_kernels)
                del parts
        ctx.use_kernels = use_kernels
        ctx.save_for_backward(q_THQ, ids_THK, *sub_keys)
        ctx.mark_non_differentiable(ids_THK)
        return scores_THK, ids_THK

    @staticmethod
    def backward(ctx, dscores_THK: Tensor, _dids: Tensor | None):
        q_THQ, ids_THK, *sub_keys = ctx.saved_tensors
        T, H, K = ids_THK.shape
        use_kernels = (
            ctx.use_kernels
            and kernel_applies(q_THQ)
            and all(t.dtype == torch.float32 for t in (q_THQ, *sub_keys))
        )
        q_RQ = q_THQ.detach().reshape(T * H, -1)  # (T*H, P*q)
        w_RK = dscores_THK.reshape(T * H, K)
        with autocast_off(q_THQ.device.type):
            if use_kernels:
                dq_RQ, dkeys = _routing_backward_kernels(ids_THK, w_RK, q_RQ, sub_keys, ctx.needs_input_grad)
            else:
                dq_RQ, dkeys = _routing_backward_torch(_part_rows(ids_THK, sub_keys), w_RK, q_RQ, sub_keys, ctx.needs_input_grad)
        dq = dq_RQ.view(T, H, -1) if dq_RQ is not None else None
        return None, None, dq, *dkeys


def _part_rows(ids_THK: Tensor, sub_keys: Sequence[Tensor]) -> list[Tensor]:
    """(T*H, K) per part: each selected expert's row of that part's table, flattened to (H * n_p, q)
    for per-head sets."""
    T, H, K = ids_THK.shape
    rows = []
    for keys, c_THK in zip(sub_keys, unravel_ids(ids_THK, [keys.shape[-2] for keys in sub_keys]), strict=True):
        if keys.dim() == 3:
            c_THK = c_THK + torch.arange(H, device=c_THK.device).unsqueeze(-1) * keys.shape[-2]
        rows.append(c_THK.reshape(T * H, K))
    return rows


def _routing_backward_kernels(ids_THK, w_RK, q_RQ, sub_keys, needs_input_grad):
    """Triton routing backward, every part in one launch per kernel (no host sync, no atomics).

    The parts' tables are stacked into one (sum of heights, q) table, part p's rows offset by the heights
    before it: dq is one weighted gather, the sub-keys' gradient one sort and one segment reduction. Two
    parts (the fused retrieval's case) get their stacked rows from one kernel (``stacked_rows_triton``).
    """
    q = sub_keys[0].shape[-1]
    tables = [keys.detach().reshape(-1, q) for keys in sub_keys]
    heights = [t.shape[0] for t in tables]
    if len(sub_keys) == 2:
        sizes = (sub_keys[0].shape[-2], sub_keys[1].shape[-2])
        idx_PRK = stacked_rows_triton(ids_THK, sizes, (sub_keys[0].dim() == 3, sub_keys[1].dim() == 3))
    else:
        offsets = [sum(heights[:p]) for p in range(len(heights))]
        rows = _part_rows(ids_THK, sub_keys)
        idx_PRK = torch.stack([r + off if off else r for r, off in zip(rows, offsets, strict=True)])
    w_RK = w_RK.float().contiguous()
    dq_RQ = None
    if needs_input_grad[2]:
        table = torch.cat(tables) if len(tables) > 1 else tables[0]
        dq_RQ = weighted_gather_triton(idx_PRK, w_RK, table, torch.empty_like(q_RQ))
    need_keys = needs_input_grad[3 : 3 + len(sub_keys)]
    dkeys = [None] * len(sub_keys)
    if any(need_keys):
        dtable = segment_rows_triton(idx_PRK, w_RK, q_RQ, sum(heights))
        # the parts' gradients are views of this one (sum of heights, q) buffer
        dkeys = [
            d.view_as(keys) if need else None
            for d, keys, need in zip(dtable.split(heights), sub_keys, need_keys, strict=True)
        ]
    return dq_RQ, dkeys


def _routing_backward_torch(rows, w_RK, q_RQ, sub_keys, needs_input_grad):
    """PyTorch routing backward: embedding_bag for dq, an explicit index_add for each part's sub-keys."""
    q = sub_keys[0].shape[-1]
    dq_parts, dkeys = [], []
    for p, (keys, idx) in enumerate(zip(sub_keys, rows, strict=True)):
        w = w_RK.to(keys.dtype)
        table = keys.detach().reshape(-1, q)
        dq_parts.append(F.embedding_bag(idx, table, per_sample_weights=w, mode="sum"))  # (T*H, q)
        if needs_input_grad[3 + p]:
            # d key_p[c] = sum over the (row, slot) entries that chose c of dscore * q_p(row); an
            # explicit index_add (not autograd.grad, which torch.compile cannot trace).
            q_p = q_RQ[:, p * q : (p + 1) * q]
            contrib_EQ = (w.unsqueeze(-1) * q_p.unsqueeze(1)).reshape(-1, q)  # (T*H*K, q)
            dkeys.append(torch.zeros_like(table).index_add_(0, idx.reshape(-1), contrib_EQ).view_as(keys))
        else:
            dkeys.append(None)
    return (torch.cat(dq_parts, dim=-1) if needs_input_grad[2] else None), dkeys


def retrieve_topk(
    q_THQ: Tensor, sub_keys: Sequence[Tensor], k: int, use_kernels: bool = True
) -> tuple[Tensor, Tensor]:
    """Exact top-k experts per (token, head) from queries and sub-keys, differentiable in both.

    Args:
        q_THQ: (T, H, P*q) queries (fp32 or wider; scores are computed in this dtype).
        sub_keys: P tensors, (n_p, q) shared by heads or (H, n_p, q) per head, same dtype as q_THQ.
        k: experts per head, ``1 <= k <= prod(n_p)``.
        use_kernels: False keeps forward and backward in PyTorch even on CUDA (``PEERConfig.kernel:
            torch``); True runs the Triton routing kernels where they apply.

    Returns:
        scores (T, H, k), equal to ``product_topk(subkey_scores_from_queries(q_THQ, sub_keys), k)``'s
        (on CUDA with two fp32 parts: the fused kernels', whose score dots round differently; see
        ``llm/ops/triton_retrieval.py``);
        ids (T, H, k) int64 flat ids (row-major over the parts), ties to the lower id. The backward
        touches only the selected sub-keys (see ``_ProductKeyRetrieval``).
    """
    return _ProductKeyRetrieval.apply(k, use_kernels, q_THQ, *sub_keys)


def brute_force_topk(part_scores: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Reference: score every expert of the product, then take the top-k with the same tie rule.

    Memory is ``prod(n_p)`` per row: for tests and small analyses only. Same shapes as ``product_topk``.
    """
    full_RN = part_scores[0]
    for part in part_scores[1:]:
        # (..., N_so_far, 1) + (..., 1, n_p), flattened row-major: ids ascend along the last dim.
        full_RN = (full_RN.unsqueeze(-1) + part.unsqueeze(-2)).flatten(-2)
    return _select(full_RN, None, k)
