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
from torch import Tensor

from llm.ops.triton_topk import topk_positions


def _select(scores_RC: Tensor, ids_RC: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of candidates listed in ascending-id order; ties go to the lower id.

    ``ids_RC=None`` means the ids are ``arange(C)``. Returns (scores, ids), each (..., k), sorted by
    (score descending, id ascending). ``topk_positions`` breaks ties by the lowest position (= lowest id):
    a stable sort on CPU, a register top-k kernel on CUDA; ``torch.topk`` documents no tie order.
    """
    order_Rk = topk_positions(scores_RC, k)
    ids_Rk = order_Rk if ids_RC is None else ids_RC.gather(-1, order_Rk)
    return scores_RC.gather(-1, order_Rk), ids_Rk


def _sort_by_id(scores_Rk: Tensor, ids_Rk: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder kept candidates by ascending id (ids are unique) so a merge grid comes out in id order."""
    ids_sorted, perm = ids_Rk.sort(dim=-1)
    return scores_Rk.gather(-1, perm), ids_sorted


def product_topk(part_scores: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k over the Cartesian product of P sub-key score sets.

    Args:
        part_scores: P tensors, part p of shape (..., n_p), same leading dims and dtype.
        k: experts to keep, ``1 <= k <= prod(n_p)``. A part with ``n_p < k`` keeps all of its sub-keys.

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

    scores_Rk, ids_Rk = _select(part_scores[0], None, min(k, sizes[0]))
    for part, n_p in zip(part_scores[1:], sizes[1:], strict=True):
        # Prune the new part on its own first: only its top-k sub-keys can appear in the product's top-k.
        part_Rk, part_ids_Rk = _sort_by_id(*_select(part, None, min(k, n_p)))
        scores_Rk, ids_Rk = _sort_by_id(scores_Rk, ids_Rk)
        # (..., a, b) grid of sums; row-major over (a, b) lists candidates in ascending flat id.
        cand_Rab = scores_Rk.unsqueeze(-1) + part_Rk.unsqueeze(-2)
        cand_ids_Rab = ids_Rk.unsqueeze(-1) * n_p + part_ids_Rk.unsqueeze(-2)
        num_cand = cand_Rab.shape[-1] * cand_Rab.shape[-2]
        scores_Rk, ids_Rk = _select(cand_Rab.flatten(-2), cand_ids_Rab.flatten(-2), min(k, num_cand))
    return scores_Rk, ids_Rk


def brute_force_topk(part_scores: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Reference: score every expert of the product, then take the top-k with the same tie rule.

    Memory is ``prod(n_p)`` per row: for tests and small analyses only. Same shapes as ``product_topk``.
    """
    full_RN = part_scores[0]
    for part in part_scores[1:]:
        # (..., N_so_far, 1) + (..., 1, n_p), flattened row-major: ids ascend along the last dim.
        full_RN = (full_RN.unsqueeze(-1) + part.unsqueeze(-2)).flatten(-2)
    return _select(full_RN, None, k)
