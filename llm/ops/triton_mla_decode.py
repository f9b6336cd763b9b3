"""Triton absorbed-MLA decode over the paged latent cache (flash-decoding: split the sequence, then merge).

Every head reads the same cache rows ``[c_kv | k_pe]``, so one program takes a block of query rows
(row = t * H + h, all heads of a token together) and one slice of the sequence, and reads each cache row
once for all of them: a single pass over the cache, where the torch reference (``mla_decode.py``) makes two
(scores, then values). A second kernel merges the slices with their log-sum-exps.

Inference only (no backward). Runs under ``TRITON_INTERPRET=1`` on CPU tensors for the tests; uses only
Triton APIs present in 3.6. fp32 inputs on a GPU go through tf32 dot products.

Shapes: B batch, Tq query tokens, H heads, M = Tq * H query rows, L kv_lora_rank, R rope dims,
C = L + R, P pages of 64 tokens, Z splits of the sequence.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

PAGE = 64  # tokens per cache block (llm/models/kv_cache.py BLOCK_SIZE)


@triton.jit
def _mla_decode_split_kernel(
    Q, KV, BT, O_PART, LSE_PART,
    start, num_rows, num_heads, tokens_per_split, scale_log2,
    stride_qb, stride_qm,
    stride_kvp, stride_kvt,
    stride_btb,
    stride_ob, stride_oz, stride_om,
    stride_lb, stride_lz,
    L: tl.constexpr, R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    b = tl.program_id(0)
    row_block = tl.program_id(1)
    split = tl.program_id(2)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    row_ok = rows < num_rows
    limit = start + rows // num_heads  # last visible key of each row (causal among new tokens)
    total = start + num_rows // num_heads  # keys in the cache
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    l_ok = offs_l < L
    r_ok = offs_r < R

    q_ptr = Q + b * stride_qb + rows[:, None] * stride_qm
    q_l = tl.load(q_ptr + offs_l[None, :], mask=row_ok[:, None] & l_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_L)
    q_r = tl.load(q_ptr + L + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_R)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_L], dtype=tl.float32)

    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, total)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) token indices
        n_ok = n < hi
        # n0 is a multiple of BLOCK_N, which divides the page: the block lies in one page (one id to look up).
        page = tl.load(BT + b * stride_btb + n0 // PAGE_SIZE).to(tl.int64)
        kv_ptr = KV + page * stride_kvp + ((n0 % PAGE_SIZE) + tl.arange(0, BLOCK_N))[:, None] * stride_kvt
        k_l = tl.load(kv_ptr + offs_l[None, :], mask=n_ok[:, None] & l_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_L)
        k_r = tl.load(kv_ptr + L + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)

        s = tl.dot(q_l, tl.trans(k_l)) + tl.dot(q_r, tl.trans(k_r))  # (BLOCK_M, BLOCK_N) fp32
        s = s * scale_log2
        visible = (n[None, :] <= limit[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids inf - inf = nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_l.dtype), k_l)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptr = O_PART + b * stride_ob + split * stride_oz + rows[:, None] * stride_om + offs_l[None, :]
    tl.store(o_ptr, out, mask=row_ok[:, None] & l_ok[None, :])
    tl.store(LSE_PART + b * stride_lb + split * stride_lz + rows, lse, mask=row_ok)


@triton.jit
def _mla_decode_merge_kernel(
    O_PART, LSE_PART, OUT,
    num_splits,
    stride_ob, stride_oz, stride_om,
    stride_lb, stride_lz,
    stride_outb, stride_outm,
    L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_Z: tl.constexpr,
):
    b = tl.program_id(0)
    row = tl.program_id(1)
    offs_z = tl.arange(0, BLOCK_Z)
    offs_l = tl.arange(0, BLOCK_L)
    z_ok = offs_z < num_splits
    lse = tl.load(LSE_PART + b * stride_lb + offs_z * stride_lz + row, mask=z_ok, other=float("-inf"))  # (BLOCK_Z,)
    # Split 0 always holds key 0, which every row sees, so the max is finite.
    w = tl.exp2(lse - tl.max(lse, axis=0))  # (BLOCK_Z,)
    parts = tl.load(
        O_PART + b * stride_ob + offs_z[:, None] * stride_oz + row * stride_om + offs_l[None, :],
        mask=z_ok[:, None] & (offs_l[None, :] < L),
        other=0.0,
    )  # (BLOCK_Z, BLOCK_L)
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(OUT + b * stride_outb + row * stride_outm + offs_l, out.to(OUT.dtype.element_ty), mask=offs_l < L)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def default_num_splits(programs: int, total: int, block_m: int, device: torch.device) -> int:
    """Sequence slices per (batch, row block) program.

    With small row blocks several programs per SM keep enough loads in flight (H100, H=16, B=64, 64-token
    blocks: 12 slices 2.25 TB/s, 8 slices 1.99, 16 slices 2.07); 64-row blocks hold more registers, so fewer
    fit and about two per SM measured best (H100, H=128: 2 slices 0.95 TB/s, 4 slices 0.87).
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    per_sm = 6 if block_m <= 16 else 2
    return max(1, min(16, round(per_sm * sms / programs), triton.cdiv(total, 16)))


def mla_decode_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    block_table: torch.Tensor,
    start: int,
    kv_lora_rank: int,
    scale: float,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Absorbed attention over a paged latent cache; same contract as ``mla_decode_reference``.

    q (B, Tq, H, C) = [absorbed q_nope | roped q_pe]; kv (pages, 64, 1, C) paged cache already holding the
    new tokens; block_table (B, pages per sequence) int32. Returns (B, Tq, H, L) in q's dtype.
    num_splits: sequence slices per (batch, row block); None: ``default_num_splits``.
    block_m / block_n / num_warps: None picks the settings that measured best on an H100 (benchmarks/mla.py,
    RESULTS.md): 16 rows for up to 16 query rows, else 64; 64 tokens; 8 warps.
    """
    b, tq, h, c = q.shape
    small = tq * h <= 16
    block_m = block_m or (16 if small else 64)
    block_n = block_n or 64
    num_warps = num_warps or 8
    assert kv.shape[1] == PAGE and kv.shape[-1] == c, "kv must be (pages, 64, 1, L + R)"
    assert PAGE % block_n == 0, "a block of tokens must not straddle pages"
    rope = c - kv_lora_rank
    rows = tq * h
    total = start + tq
    q2 = q.reshape(b, rows, c)  # (B, M, C)
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = default_num_splits(b * row_blocks, total, block_m, q.device)
    tokens_per_split = triton.cdiv(triton.cdiv(total, num_splits), block_n) * block_n
    num_splits = triton.cdiv(total, tokens_per_split)

    o_part = torch.empty(b, num_splits, rows, kv_lora_rank, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b, num_splits, rows, device=q.device, dtype=torch.float32)
    kv_tok = kv.view(kv.shape[0], PAGE, c)  # (P, 64, C)
    _mla_decode_split_kernel[(b, row_blocks, num_splits)](
        q2, kv_tok, block_table, o_part, lse_part,
        start, rows, h, tokens_per_split, scale * math.log2(math.e),
        q2.stride(0), q2.stride(1),
        kv_tok.stride(0), kv_tok.stride(1),
        block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        L=kv_lora_rank, R=rope, BLOCK_L=_pow2(kv_lora_rank), BLOCK_R=_pow2(rope),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=PAGE,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(b, rows, kv_lora_rank, device=q.device, dtype=q.dtype)
    _mla_decode_merge_kernel[(b, rows)](
        o_part, lse_part, out,
        num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        L=kv_lora_rank, BLOCK_L=_pow2(kv_lora_rank, 1), BLOCK_Z=_pow2(num_splits, 1),
    )
    return out.view(b, tq, h, kv_lora_rank)
