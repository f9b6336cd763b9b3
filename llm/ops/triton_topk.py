"""Row-wise top-k with ties to the lowest position: a Triton kernel and its torch reference.

PEER routing selects the top-k of every (token, head) row of sub-key scores (n_p = 1024 wide at the
paper's size), then the top-k of the k x k merge grid. A stable descending ``torch.sort`` gives the
documented tie rule but sorts all n entries. The kernel keeps a block of rows in registers and extracts
the maximum k times, reading each score once.

One reduction per extracted element: each score is packed with its position into one int64 key,
``(monotone int32 of the float's bits) << 32 | (2^31 - 1 - position)``, so a single integer ``max``
finds the largest score and, among equal scores, the lowest position; value and position are decoded
from the winning key, and the winner is knocked out by key equality (keys are unique within a row).
The earlier kernel needed three cross-warp reductions per pass (max value, min position, fallback) and
was latency-bound (0.59 ms for 32768 x 1024, k=16, on an H200). Small rows per program and 1-2 warps
keep a row's reduction inside one warp.

Tie rule (both implementations): among equal scores the lowest position wins (-0.0 ties with +0.0 as in
``torch.sort``), so listing candidates in ascending-id order makes ties go to the lowest id. NaN: the
reference sorts every NaN first; the kernel ranks NaN below -inf (never selected while a number remains;
it comes back as a NaN value), so the two agree only on NaN-free rows (routing scores are finite unless training has
already diverged). The kernel computes in fp32: float64 inputs are rounded first (routing on CUDA uses
fp32; the dispatcher sends float64 to the reference).

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
# Keys (int64) held per program: 1024 over 1 warp is 32 keys (64 registers) a thread, so a 1024-wide row
# is reduced with warp shuffles alone. Chosen by the sweep in benchmarks/routing_topk.py.
_TILE_ELEMENTS = 1024
# Padded keys a thread holds; num_warps = tile / (32 * this), clamped to [1, 8].
_KEYS_PER_THREAD = 32


def topk_reference(scores_RC: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(R, C) -> values (R, k), int64 positions (R, k): descending, ties to the lowest position."""
    sorted_ = torch.sort(scores_RC, dim=-1, descending=True, stable=True)
    return sorted_.values[..., :k], sorted_.indices[..., :k]


def topk_positions_reference(scores_RC: Tensor, k: int) -> Tensor:
    """(R, C) -> (R, k) int64 positions of the k largest scores, descending, ties to the lowest position."""
    return topk_reference(scores_RC, k)[1]


if triton is not None:
    # Below every packed key of a finite or infinite score (fills padding and knocked-out entries).
    _EMPTY_KEY = tl.constexpr(-(2**63) + 1)

    @triton.jit
    def pack_score_id(s, ids):
        """fp32 score, int id (0 <= id < 2^31) -> int64 key; larger key = higher score, then lower id."""
        bits = s.to(tl.int32, bitcast=True)
        mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude so order is signed-int order
        mono = tl.where(mono == -1, 0, mono)  # -0.0 (0x80000000 -> -1) ties with +0.0
        mono = tl.where(s == s, mono, -2147483647)  # NaN ranks below -inf (mono -2139095041)
        return (mono.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)

    @triton.jit
    def unpack_score_id(key):
        """Inverse of ``pack_score_id`` (-0.0 comes back as +0.0): int64 key -> (fp32 score, int64 id)."""
        mono = (key >> 32).to(tl.int32)
        bits = mono ^ ((mono >> 31) & 0x7FFFFFFF)
        return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0x7FFFFFFF)

    @triton.jit
    def _topk_kernel(
        scores_ptr,  # (R, C) any float dtype, row stride `stride_r`, unit column stride
        vals_ptr,  # (R, K) fp32
        pos_ptr,  # (R, K) int64
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
        inside = row_ok[:, None] & (cols[None, :] < C)
        s = tl.load(scores_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :], mask=inside, other=0.0)
        key = tl.where(inside, pack_score_id(s.to(tl.float32), cols[None, :]), _EMPTY_KEY)
        out = rows.to(tl.int64) * K
        for j in tl.static_range(K):
            best = tl.max(key, axis=1)  # (BLOCK_R,)
            val, pos = unpack_score_id(best)
            tl.store(vals_ptr + out + j, val, mask=row_ok)
            tl.store(pos_ptr + out + j, pos, mask=row_ok)
            key = tl.where(key == best[:, None], _EMPTY_KEY, key)


def topk_launch_config(R: int, C: int, tile_elements: int = _TILE_ELEMENTS) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for rows of C candidates: ~tile_elements padded keys per program."""
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(triton.next_power_of_2(max(R, 1)), tile_elements // block_c))
    num_warps = max(1, min(8, block_r * block_c // (32 * _KEYS_PER_THREAD)))
    return block_r, block_c, num_warps


def topk_triton(
    scores_RC: Tensor, k: int, tile_elements: int = _TILE_ELEMENTS, num_warps: int | None = None
) -> tuple[Tensor, Tensor]:
    """Same contract as ``topk_reference`` for 2-D ``scores_RC`` with C <= MAX_KERNEL_COLUMNS.

    Values come back in fp32 (the scores converted to fp32; -0.0 as +0.0). ``tile_elements`` and
    ``num_warps`` set the launch (benchmarks sweep them); the defaults are the fastest measured.
    """
    assert triton is not None, "triton is not installed"
    R, C = scores_RC.shape
    assert 1 <= k <= C <= MAX_KERNEL_COLUMNS, (k, C)
    if scores_RC.stride(-1) != 1:
        scores_RC = scores_RC.contiguous()
    vals_Rk = torch.empty(R, k, dtype=torch.float32, device=scores_RC.device)
    pos_Rk = torch.empty(R, k, dtype=torch.int64, device=scores_RC.device)
    if R == 0:
        return vals_Rk, pos_Rk
    block_r, block_c, warps = topk_launch_config(R, C, tile_elements)
    _topk_kernel[(triton.cdiv(R, block_r),)](
        scores_RC,
        vals_Rk,
        pos_Rk,
        R,
        C,
        scores_RC.stride(0),
        K=k,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps or warps,
    )
    return vals_Rk, pos_Rk


def topk_positions_triton(scores_RC: Tensor, k: int, tile_elements: int = _TILE_ELEMENTS) -> Tensor:
    """Same contract as ``topk_positions_reference`` for 2-D ``scores_RC`` with C <= MAX_KERNEL_COLUMNS."""
    return topk_triton(scores_RC, k, tile_elements)[1]


def kernel_applies(scores: Tensor) -> bool:
    """True where ``topk`` runs the kernel: CUDA, fp32/bf16/fp16, 1 <= C <= MAX_KERNEL_COLUMNS."""
    return (
        triton is not None
        and scores.is_cuda
        and scores.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and 0 < scores.shape[-1] <= MAX_KERNEL_COLUMNS
        and scores.numel() > 0
    )


def topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(..., C) -> values (..., k), int64 positions (..., k): descending, ties to the lowest position.

    No gradient flows through the values (gather from ``scores`` with the positions for one). The kernel
    runs where ``kernel_applies`` (values then in fp32); elsewhere the stable-sort reference (values in
    the input dtype). Both give the same positions and equal values on NaN-free rows.
    """
    if not kernel_applies(scores):
        vals, pos = topk_reference(scores.detach(), k)
        return vals, pos
    lead, C = scores.shape[:-1], scores.shape[-1]
    vals, pos = topk_triton(scores.detach().reshape(-1, C), k)
    return vals.view(*lead, k), pos.view(*lead, k)


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """(..., C) -> (..., k) int64 positions, descending, ties to the lowest position (see ``topk``)."""
    return topk(scores, k)[1]
