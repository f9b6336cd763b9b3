"""Row-wise top-k positions with ties to the lowest position: a Triton kernel and its torch reference.

PEER routing selects the top-k of every (token, head) row of sub-key scores (n_p = 1024 wide at the
paper's size), then the top-k of the k x k merge grid. A stable descending ``torch.sort`` gives the
documented tie rule but sorts all n entries: measured 3.5 ms of the layer's 4.0 ms forward at T=4096
on an H200 (``benchmarks/peer_layer.py``). The kernel instead keeps a block of rows in registers and
extracts the maximum k times, reading each score once.

Only positions come back (no gradient): callers gather the values from the differentiable scores.
Tie rule (both implementations): among equal scores the lowest position wins, so listing candidates in
ascending-id order makes ties go to the lowest id. NaN scores: the reference sorts NaN first; the kernel
never selects NaN while a number remains, so the two agree only on NaN-free rows (routing scores are
finite unless training has already diverged).

Shape legend: R rows, C candidates per row, k kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is an optional dependency (the dev extra, or a CUDA install of torch).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

# Widest row the kernel keeps in registers; wider rows (e.g. a single 65536-wide part) use the reference.
MAX_KERNEL_COLUMNS = 4096
# Scores held per program (rows x padded columns): 8K fp32 values over 4 warps is 64 registers a thread.
_TILE_ELEMENTS = 8192


def topk_positions_reference(scores_RC: Tensor, k: int) -> Tensor:
    """(R, C) -> (R, k) int64 positions of the k largest scores, descending, ties to the lowest position."""
    return torch.sort(scores_RC, dim=-1, descending=True, stable=True).indices[..., :k]


if triton is not None:

    @triton.jit
    def _topk_positions_kernel(
        scores_ptr,  # (R, C) any float dtype, row stride `stride_r`, unit column stride
        out_ptr,  # (R, K) int64
        R,
        C,
        stride_r,
        K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < R
        live = row_ok[:, None] & (cols[None, :] < C)  # (BLOCK_R, BLOCK_C) not yet taken, inside the row
        s = tl.load(
            scores_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=live, other=float("-inf")
        ).to(tl.float32)
        for j in tl.static_range(K):
            best = tl.max(tl.where(live, s, float("-inf")), axis=1)  # (BLOCK_R,)
            hit = live & (s == best[:, None])
            pos = tl.min(tl.where(hit, cols[None, :], BLOCK_C), axis=1)
            # Rows whose remaining scores are all NaN have no hit: take the first live column instead.
            first_live = tl.min(tl.where(live, cols[None, :], BLOCK_C), axis=1)
            pos = tl.where(pos < BLOCK_C, pos, first_live)
            pos = tl.minimum(pos, C - 1)
            tl.store(out_ptr + rows.to(tl.int64) * K + j, pos.to(tl.int64), mask=row_ok)
            live = live & (cols[None, :] != pos[:, None])


def topk_positions_triton(scores_RC: Tensor, k: int, tile_elements: int = _TILE_ELEMENTS) -> Tensor:
    """Same contract as ``topk_positions_reference`` for 2-D ``scores_RC`` with C <= MAX_KERNEL_COLUMNS."""
    assert triton is not None, "triton is not installed"
    R, C = scores_RC.shape
    assert 1 <= k <= C <= MAX_KERNEL_COLUMNS, (k, C)
    if scores_RC.stride(-1) != 1:
        scores_RC = scores_RC.contiguous()
    out_Rk = torch.empty(R, k, dtype=torch.int64, device=scores_RC.device)
    if R == 0:
        return out_Rk
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(triton.next_power_of_2(R), tile_elements // block_c))
    _topk_positions_kernel[(triton.cdiv(R, block_r),)](
        scores_RC, out_Rk, R, C, scores_RC.stride(0), K=k, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4
    )
    return out_Rk


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """(..., C) -> (..., k) int64 positions, descending, ties to the lowest position.

    The Triton kernel runs for CUDA tensors with C <= MAX_KERNEL_COLUMNS; everything else (CPU, very wide
    rows) uses the stable-sort reference. Both give the same positions on NaN-free rows.
    """
    C = scores.shape[-1]
    if triton is None or not scores.is_cuda or C > MAX_KERNEL_COLUMNS or scores.numel() == 0:
        return topk_positions_reference(scores, k)
    lead = scores.shape[:-1]
    return topk_positions_triton(scores.detach().reshape(-1, C), k).view(*lead, k)
