"""The merge step of PEER's product-key top-k: a Triton kernel and its torch reference.

After each part's own top-k (``llm/ops/triton_topk.py``), two candidate lists are merged: every pair
(a_i, b_j) scores ``a_i + b_j`` with flat id ``id_a * n_b + pos_b``, and the top-k of the k_a x k_b
grid is kept (ties to the lower flat id). The torch path builds the grid, sorts both lists by id so
grid order is id order, and runs a stable top-k: ~8 kernels and (R, k, k) temporaries. The kernel forms
the grid in registers and packs (score, flat id) into int64 keys (``pack_score_id``), so the tie rule
needs no id-ordered layout and each extracted element costs one ``max``.

Sums are formed as ``a + b`` in fp32, the same operation as the reference, so scores agree bit for bit.
Flat ids must stay below 2^31 (``MAX_FLAT_ID``); larger products use the reference.

Shape legend: R rows, KA / KB kept candidates of the two lists, k kept after the merge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llm.ops.triton_topk import kernel_applies, topk_positions_reference

try:  # Triton is an optional dependency (the dev extra, or a CUDA install of torch).
    import triton
    import triton.language as tl

    from llm.ops.triton_topk import _EMPTY_KEY, pack_score_id, unpack_score_id
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

# Flat ids are packed into 31 bits.
MAX_FLAT_ID = 2**31 - 1
# Grid keys (int64) per program, as in triton_topk: 1024 over one warp.
_TILE_ELEMENTS = 1024


def merge_topk_reference(
    a_vals_RA: Tensor, a_ids_RA: Tensor, b_vals_RB: Tensor, b_pos_RB: Tensor, n_b: int, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of the grid a_vals[:, i] + b_vals[:, j] with ids a_ids[:, i] * n_b + b_pos[:, j].

    Returns (values (R, k), int64 flat ids (R, k)), by score descending, ties to the lower flat id.
    Candidate lists may come in any order (ids within a list unique).
    """
    cand_RAB = (a_vals_RA.unsqueeze(-1) + b_vals_RB.unsqueeze(-2)).flatten(-2)
    ids_RAB = (a_ids_RA.unsqueeze(-1) * n_b + b_pos_RB.unsqueeze(-2)).flatten(-2)
    ids_sorted, perm = ids_RAB.sort(dim=-1)  # id order, so "lowest position" = "lowest id"
    order = topk_positions_reference(cand_RAB.gather(-1, perm), k)
    return cand_RAB.gather(-1, perm).gather(-1, order), ids_sorted.gather(-1, order)


if triton is not None:

    @triton.jit
    def _merge_kernel(
        a_vals_ptr,  # (R, KA) fp32
        a_ids_ptr,  # (R, KA) int64
        b_vals_ptr,  # (R, KB) fp32
        b_pos_ptr,  # (R, KB) int64
        vals_ptr,  # (R, K) fp32 out
        ids_ptr,  # (R, K) int64 out
        R,
        KA,
        KB,
        n_b,
        K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BA: tl.constexpr,
        BB: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        ia = tl.arange(0, BA)
        ib = tl.arange(0, BB)
        mask_a = row_ok[:, None] & (ia[None, :] < KA)
        mask_b = row_ok[:, None] & (ib[None, :] < KB)
        rows64 = rows.to(tl.int64)[:, None]
        a = tl.load(a_vals_ptr + rows64 * KA + ia[None, :], mask=mask_a, other=0.0)
        a_id = tl.load(a_ids_ptr + rows64 * KA + ia[None, :], mask=mask_a, other=0)
        b = tl.load(b_vals_ptr + rows64 * KB + ib[None, :], mask=mask_b, other=0.0)
        b_pos = tl.load(b_pos_ptr + rows64 * KB + ib[None, :], mask=mask_b, other=0)
        s = a[:, :, None] + b[:, None, :]  # (BLOCK_R, BA, BB)
        ids = a_id[:, :, None] * n_b + b_pos[:, None, :]
        ok = mask_a[:, :, None] & mask_b[:, None, :]
        key = tl.where(ok, pack_score_id(s, ids), _EMPTY_KEY)
        key = tl.reshape(key, (BLOCK_R, BA * BB))
        out = rows.to(tl.int64) * K
        for j in tl.static_range(K):
            best = tl.max(key, axis=1)
            val, flat = unpack_score_id(best)
            tl.store(vals_ptr + out + j, val, mask=row_ok)
            tl.store(ids_ptr + out + j, flat, mask=row_ok)
            key = tl.where(key == best[:, None], _EMPTY_KEY, key)


def merge_topk_triton(
    a_vals_RA: Tensor, a_ids_RA: Tensor, b_vals_RB: Tensor, b_pos_RB: Tensor, n_b: int, k: int
) -> tuple[Tensor, Tensor]:
    """Same contract as ``merge_topk_reference`` for fp32 values and flat ids < 2^31 (2-D inputs)."""
    assert triton is not None, "triton is not installed"
    R, KA = a_vals_RA.shape
    KB = b_vals_RB.shape[1]
    assert 1 <= k <= KA * KB, (k, KA, KB)
    vals_Rk = torch.empty(R, k, dtype=torch.float32, device=a_vals_RA.device)
    ids_Rk = torch.empty(R, k, dtype=torch.int64, device=a_vals_RA.device)
    if R == 0:
        return vals_Rk, ids_Rk
    ba, bb = triton.next_power_of_2(KA), triton.next_power_of_2(KB)
    block_r = max(1, min(triton.next_power_of_2(R), _TILE_ELEMENTS // (ba * bb)))
    num_warps = max(1, min(8, block_r * ba * bb // 1024))
    _merge_kernel[(triton.cdiv(R, block_r),)](
        a_vals_RA.float().contiguous(),
        a_ids_RA.contiguous(),
        b_vals_RB.float().contiguous(),
        b_pos_RB.contiguous(),
        vals_Rk,
        ids_Rk,
        R,
        KA,
        KB,
        n_b,
        K=k,
        BLOCK_R=block_r,
        BA=ba,
        BB=bb,
        num_warps=num_warps,
    )
    return vals_Rk, ids_Rk


def merge_kernel_applies(a_vals: Tensor, b_vals: Tensor, num_ids: int) -> bool:
    """True where ``merge_topk`` runs the kernel: CUDA fp32 lists whose flat ids fit in 31 bits."""
    return (
        kernel_applies(a_vals)
        and a_vals.dtype == torch.float32
        and b_vals.dtype == torch.float32
        and num_ids <= MAX_FLAT_ID + 1
    )


def merge_topk(
    a_vals: Tensor, a_ids: Tensor, b_vals: Tensor, b_pos: Tensor, n_b: int, k: int, num_ids: int
) -> tuple[Tensor, Tensor]:
    """(..., KA) x (..., KB) lists -> top-k (values, flat ids), each (..., k); no gradient flows.

    ``a_ids`` are flat ids over the earlier parts, ``b_pos`` positions in the new part (< n_b), and
    ``num_ids`` the size of the merged product (decides whether ids fit the kernel's 31 bits). The kernel
    runs where ``merge_kernel_applies``, else ``merge_topk_reference`` (same values and ids).
    """
    lead = a_vals.shape[:-1]
    a2, ai2 = a_vals.detach().reshape(-1, a_vals.shape[-1]), a_ids.reshape(-1, a_ids.shape[-1])
    b2, bp2 = b_vals.detach().reshape(-1, b_vals.shape[-1]), b_pos.reshape(-1, b_pos.shape[-1])
    use_kernel = merge_kernel_applies(a_vals, b_vals, num_ids)
    fn = merge_topk_triton if use_kernel else merge_topk_reference
    vals, ids = fn(a2, ai2, b2, bp2, n_b, k)
    return vals.view(*lead, k), ids.view(*lead, k)


# ----------------------------------------------------------------------------------------
# Routing backward: the selected sub-keys' gradients without embedding_bag (no host sync).
# ----------------------------------------------------------------------------------------
# embedding_bag's backward reads a segment count back to the host, which drained the GPU queue twice
# per layer backward. Both pieces below are sync-free: a weighted gather for the queries' gradient, and
# a sort + searchsorted segmentation (its size is the known table height) for the sub-keys' gradient.

if triton is not None:

    @triton.jit
    def _weighted_gather_kernel(
        idx_ptr,  # (P, R, K) rows of the stacked table (any integer dtype: narrow sort keys too)
        w_ptr,  # (R, K) fp32 weights, shared by the parts
        table_ptr,  # (n, Q) fp32, unit column stride
        out_ptr,  # (R, P*Q) fp32 out (part p in columns p*Q ..), row stride `stride_out`
        R,
        Q,
        stride_out,
        K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        part = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_Q)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols[None, :] < Q)
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=tl.float32)
        for j in tl.static_range(K):  # fixed order over the k slots: deterministic sums
            # int64 before the offset math: the rows come as narrow sort keys (int16 / int32)
            idx = tl.load(idx_ptr + (part * R + rows64) * K + j, mask=row_ok, other=0).to(tl.int64)
            w = tl.load(w_ptr + rows64 * K + j, mask=row_ok, other=0.0)
            t = tl.load(table_ptr + idx[:, None] * Q + cols[None, :], mask=mask, other=0.0)
            acc += w[:, None] * t
        tl.store(out_ptr + rows64[:, None] * stride_out + part * Q + cols[None, :], acc, mask=mask)

    @triton.jit
    def _segment_rows_kernel(
        perm_ptr,  # (P*R*K,) int64 entry ids (p * R*K + r * K + slot) sorted by table row
        seg_ptr,  # (n + 1,) int64 segment boundaries into perm
        w_ptr,  # (R*K,) fp32 weights by entry id modulo R*K (shared by the parts)
        src_ptr,  # (R, P*Q) fp32, row stride `stride_src`, unit column stride: part p in columns p*Q ..
        out_ptr,  # (SPLIT, n, Q) fp32 out: partial sums, one slice per split
        n,
        Q,
        RK,
        stride_src,
        K: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        cols = tl.arange(0, BLOCK_Q)
        mask_q = cols < Q
        start = tl.load(seg_ptr + c)
        end = tl.load(seg_ptr + c + 1)
        acc = tl.zeros((BLOCK_S, BLOCK_Q), dtype=tl.float32)
        # Split `split` takes blocks split, split + SPLIT, ... of the segment: fixed lanes, so the sums
        # are deterministic, and a long segment (a hot sub-key) is spread over SPLIT programs.
        for p0 in range(start + split * BLOCK_S, end, SPLIT * BLOCK_S):
            offs = p0 + tl.arange(0, BLOCK_S)
            ok = offs < end
            # int32 index math (the launcher checks P*R*K < 2^31): a 64-bit division by the runtime RK
            # made the kernel ~25% slower on an H100
            entry = tl.load(perm_ptr + offs, mask=ok, other=0).to(tl.int32)
            part = entry // RK
            within = entry - part * RK  # r * K + slot
            w = tl.load(w_ptr + within, mask=ok, other=0.0)
            src_off = (within // K).to(tl.int64) * stride_src + part * Q
            s = tl.load(
                src_ptr + src_off[:, None] + cols[None, :],
                mask=ok[:, None] & mask_q[None, :],
                other=0.0,
            )
            acc += w[:, None] * s
        tl.store(out_ptr + (split * n + c) * Q + cols, tl.sum(acc, axis=0), mask=mask_q)


    @triton.jit
    def _stacked_rows_kernel(
        ids_ptr,  # (T*H*K,) int64 flat expert ids c0 * n1 + c1, entry e = (t * H + h) * K + slot
        out_ptr,  # (2, T*H*K) out, the key dtype: rows of the stacked (height0 + height1, q) table
        n,
        n1,
        height0,
        H,
        K,
        head_rows0,  # n0 with one sub-key set per head (head h's rows start at h * n0), else 0
        head_rows1,  # n1 likewise
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        c0 = ids // n1
        head = (offs // K) % H
        row0 = c0 + head * head_rows0
        row1 = height0 + ids - c0 * n1 + head * head_rows1
        tl.store(out_ptr + offs, row0.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_ptr + n + offs, row1.to(out_ptr.dtype.element_ty), mask=ok)


# Gathered elements per program of the routing backward kernels (rows x Q fp32 values).
_ROUTING_BWD_TILE = 4096
# Programs per table row in the sub-key gradient: at the paper's size 1024 rows x ~512 entries each,
# one program per row left the GPU latency-bound (0.118 ms per part on an H200).
_SEGMENT_SPLIT = 8


def _parts(idx: Tensor) -> Tensor:
    """(R, K) -> (1, R, K): one part; (P, R, K) as is."""
    return idx.unsqueeze(0) if idx.dim() == 2 else idx


def weighted_gather_triton(idx_PRK: Tensor, w_RK: Tensor, table_nQ: Tensor, out_RX: Tensor) -> Tensor:
    """out[r, p*Q:(p+1)*Q] = sum_k w[r, k] * table[idx[p, r, k]] (fp32), for every part p at once.

    idx (P, R, K) rows of one stacked table (or (R, K) for one part); ``out_RX`` (R, P*Q) fp32 with unit
    column stride (may be a column slice of a wider tensor).
    """
    idx_PRK = _parts(idx_PRK)
    P, R, K = idx_PRK.shape
    Q = table_nQ.shape[1]
    assert out_RX.shape == (R, P * Q) and out_RX.stride(1) == 1 and out_RX.dtype == torch.float32
    if R == 0:
        return out_RX
    block_q = triton.next_power_of_2(Q)
    block_r = max(1, min(64, _ROUTING_BWD_TILE // block_q, triton.next_power_of_2(R)))
    _weighted_gather_kernel[(triton.cdiv(R, block_r), P)](
        idx_PRK.contiguous(), w_RK.float().contiguous(), table_nQ.float().contiguous(), out_RX,
        R, Q, out_RX.stride(0), K=K, BLOCK_R=block_r, BLOCK_Q=block_q, num_warps=4,
    )  # fmt: skip
    return out_RX


def segment_key_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype holding rows of a table of height n: int16 where n fits, which cuts
    the radix sort's passes."""
    return torch.int16 if n < 2**15 else torch.int32 if n < 2**31 else torch.int64


def stacked_rows_triton(ids_THK: Tensor, sizes: tuple[int, int], per_head: tuple[bool, bool]) -> Tensor:
    """Two-part flat ids (T, H, K) -> (2, T*H, K) rows of the stacked sub-key table (part 0's rows, then
    part 1's; a part with one sub-key set per head stacks them by head), in ``segment_key_dtype``.

    One launch for what ``unravel_ids``, the per-head offsets, the part offset, a stack and the cast to
    sort keys took five to seven.
    """
    T, H, K = ids_THK.shape
    n = T * H * K
    (n0, n1), heads = sizes, [H if ph else 1 for ph in per_head]
    height0 = n0 * heads[0]
    out = torch.empty(2, T * H, K, device=ids_THK.device, dtype=segment_key_dtype(height0 + n1 * heads[1]))
    if n > 0:
        _stacked_rows_kernel[(triton.cdiv(n, 1024),)](
            ids_THK.contiguous(), out, n, n1, height0, H, K, n0 if per_head[0] else 0, n1 if per_head[1] else 0,
            BLOCK=1024, num_warps=4,
        )  # fmt: skip
    return out


def sort_segments(idx_RK: Tensor, n: int, stable: bool = True) -> tuple[Tensor, Tensor]:
    """Entries (their flat positions in idx) grouped by table row: (perm (numel,) int64, seg (n + 1,)
    int64 boundaries).

    No host sync: the number of segments is the table height n, known in advance, so ``searchsorted``
    of the sorted rows against 0..n gives every boundary (empty rows get empty segments). Keys in
    ``segment_key_dtype(n)`` (no copy when idx already is).
    """
    key_dtype = segment_key_dtype(n)
    keys = idx_RK.reshape(-1).to(key_dtype)
    sorted_keys, perm = torch.sort(keys, stable=stable)
    seg = torch.searchsorted(sorted_keys, torch.arange(n + 1, device=keys.device, dtype=key_dtype))
    return perm, seg


def segment_rows_triton(idx_PRK: Tensor, w_RK: Tensor, src_RX: Tensor, n: int, deterministic: bool = True) -> Tensor:
    """out (n, Q) fp32 with out[c] = sum over (p, r, k) where idx[p, r, k] == c of w[r, k] * src[r, p*Q:(p+1)*Q].

    idx (P, R, K) rows of one stacked table of height n (or (R, K) for one part); ``src_RX`` (R, P*Q)
    fp32 with unit column stride (may be a column slice). No atomics: entries are sorted by row and each
    row's segment is reduced by ``_SEGMENT_SPLIT`` programs (fixed interleaved blocks, partial sums added
    in split order) in sorted order (``stable`` sort when ``deterministic``, so the bits do not depend on
    the sort).
    """
    idx_PRK = _parts(idx_PRK)
    P, R, K = idx_PRK.shape
    Q = src_RX.shape[1] // P
    assert src_RX.shape[1] == P * Q and src_RX.stride(1) == 1 and src_RX.dtype == torch.float32
    assert P * R * K < 2**31, f"segment_rows_triton: {P * R * K} entries exceed int32 indexing"
    partial = torch.empty(_SEGMENT_SPLIT, n, Q, device=src_RX.device, dtype=torch.float32)
    if n == 0:
        return partial[0]
    perm, seg = sort_segments(idx_PRK, n, stable=deterministic)
    block_q = triton.next_power_of_2(Q)
    block_s = max(1, min(32, _ROUTING_BWD_TILE // block_q))
    _segment_rows_kernel[(n, _SEGMENT_SPLIT)](
        perm, seg, w_RK.float().contiguous().view(-1), src_RX, partial, n, Q, R * K, src_RX.stride(0),
        K=K, SPLIT=_SEGMENT_SPLIT, BLOCK_S=block_s, BLOCK_Q=block_q, num_warps=4,
    )  # fmt: skip
    return partial.sum(0)


def weighted_gather_reference(idx_PRK: Tensor, w_RK: Tensor, table_nQ: Tensor) -> Tensor:
    """(R, P*Q): part p's columns sum_k w[r, k] * table[idx[p, r, k]], in the table's dtype."""
    w = w_RK.to(table_nQ.dtype)
    return torch.cat([torch.einsum("rk,rkq->rq", w, table_nQ[idx]) for idx in _parts(idx_PRK)], dim=-1)


def segment_rows_reference(idx_PRK: Tensor, w_RK: Tensor, src_RX: Tensor, n: int) -> Tensor:
    """(n, Q): index_add of w[r, k] * src[r, part p's columns] into row idx[p, r, k], in src's dtype."""
    idx_PRK = _parts(idx_PRK)
    out = torch.zeros(n, src_RX.shape[1] // idx_PRK.shape[0], device=src_RX.device, dtype=src_RX.dtype)
    for idx, src in zip(idx_PRK, src_RX.chunk(idx_PRK.shape[0], dim=-1), strict=True):
        contrib = (w_RK.to(src.dtype).unsqueeze(-1) * src.unsqueeze(1)).reshape(-1, src.shape[1])
        out.index_add_(0, idx.reshape(-1), contrib)
    return out
