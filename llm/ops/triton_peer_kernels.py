"""Fused Triton kernels for the PEER expert computation (forward and atomics-free backward).

Contract (DEVELOPERS.md, "PEER expert computation"): x (T, D); indices (T, H, K) int64 flat expert ids;
scores (T, H, K) mixing weights; tables u, v (and g for gated experts) of shape (N, M, D).
hidden = act(u[i] @ x_t) (* g[i] @ x_t); out_t = sum_{h,k} score * v[i]^T hidden. fp32 accumulation.

Legend: T tokens, H heads, K experts per head, N experts, M expert hidden size, D model width,
E = H*K*M "sub-entries" per token, R touched table rows.

An expert with M hidden units is M single-neuron experts sharing one score: sub-entry j of token t is
(slot j // M, unit j % M) and reads table row indices[t, slot] * M + j % M of the (N*M, D) view of each
table. So every kernel below works on rows of (N*M, D) tables and handles M > 1 with no extra path.

Forward (one program per token): gather u (and g) rows, dot with x_t, activation, times the score,
gather v rows, weighted sum. It saves only indices, scores and the fp32 pre-activations
(E * 4 bytes per token; 512 B at the paper's h=8, k=16, m=1; twice that with g).

Backward, no atomics on the tables (GUIDE §4 "fast backward"):
  pass A, one program per token: re-gathers u, v (g) rows -> dx_t, dscores, and per sub-entry the
          coefficients dpre (for du), dgpre (for dg) and score*hidden (for dv);
  sort the T*E sub-entries by table row (torch.sort), cut into segments of equal row;
  pass B, one program per touched row: du_r = sum dpre * x_t, dv_r = sum score*hidden * dout_t,
          dg_r = sum dgpre * x_t over the row's segment, each row written exactly once; one launch
          reads x (du, dg), a second dout (dv), so each keeps a single source in L2.
Table gradients are dense (zeros + row writes) or, with ``sparse_grad=True``, sparse COO tensors
holding only the touched experts' rows (what ``llm/ops/row_sparse_adam.py`` consumes); zeroing the dense
grads is a full write of each table, the largest piece of the dense-grad backward at N = 1024^2 (1.27 of
2.80 ms on an H200, benchmarks/RESULTS.md).
With no atomics every sum has a fixed order; ``deterministic=True`` also asks torch.sort to be stable, so
the order within a row (and the bits of its gradient) does not depend on the sort implementation.
No host sync: segments are found on the device and the dense-gradient pass B's grid is the upper bound
T*E (programs past the real count R exit). Sparse gradients need R on the host to size their buffers:
the forward counts the touched rows with a bitmap and starts an asynchronous copy of R to the host
(``touched_row_count``, ``RowCount``). In a model, layer L's copy has long finished when layer L's
backward reads it, so the host does not wait; in a one-layer loop it waits at most until the GPU has
finished that layer's forward (an event wait, which torch's sync debug mode does not report). The sort
stays on the main stream: on a side stream beside pass A it saved 0.03 ms of GPU time and cost more host
time than that (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2}
# Widest model dimension kept whole in one program's registers (a row of D fp32 accumulators per
# program); wider inputs go to the torch reference.
MAX_FUSED_DIM = 8192
# Elements of one (entries, D) gathered tile: bounds registers per program (16 x 1024 with 4 warps was
# the fastest forward at D = 1024 in the benchmarks/peer_layer.py sweep; 8 warps ran 1.6-1.9x slower).
TILE_ELEMENTS = 16384

# Pass B: entries of a row's segment loaded per step, and warps per program (one program per row).
# Per entry it reads a 2 KiB row of x or dout and per touched row writes a 2 KiB gradient row per table.
# Nsight Compute showed the earlier one-launch form (both tables, 4 warps: 0.912 ms at the paper's size,
# uniform experts, H100) at 84.6 % of L2 and 76 % of DRAM throughput, with 0.64 GB more DRAM traffic
# than its writes: most likely source rows evicted by the gradient stream and fetched again. One launch
# per source keeps 8 MiB in L2 instead of 16. Swept with the coefficient gathers (0.936 ms for the
# one-launch form): S=1: 2 warps 0.686, 4 warps 0.878, 8 warps 1.424; S=2: 0.832 / 0.976 / 8.1 ms.
# Programs taking 2-8 segments at once, or chunks of sorted entries with a segmented scan (168 registers,
# 17 % occupancy), were slower (benchmarks/RESULTS.md).
ROW_BLOCK_S = 1
ROW_NUM_WARPS = 2

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """Activation of fp32 pre-activations z (0 gelu exact erf, 1 relu, 2 silu)."""
    if ACT == 0:
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 1:
        return tl.maximum(z, 0.0)
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act / d z at fp32 pre-activations z."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        return cdf + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 1:
        return tl.where(z > 0.0, 1.0, 0.0)
    else:
        sig = tl.sigmoid(z)
        return sig * (1.0 + z * (1.0 - sig))


@triton.jit
def _entry_tile(idx_ptr, score_ptr, t, e0, HK, E, D, offs_d, mask_d, M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Sub-entries e0 .. e0 + BLOCK_E of token t: (offs_e, mask_e, score, tile_off, tile_mask).

    Sub-entry e is neuron e % M of slot e // M; tile_off (BLOCK_E, BLOCK_D) addresses its table row of
    the (N*M, D) view. Shared by the forward and the token-major backward (inlined by Triton).
    """
    offs_e = e0 + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    slot = offs_e // M
    expert = tl.load(idx_ptr + t * HK + slot, mask=mask_e, other=0)
    row = expert * M + offs_e % M  # (BLOCK_E,) int64 row of the (N*M, D) tables
    score = tl.load(score_ptr + t * HK + slot, mask=mask_e, other=0.0).to(tl.float32)
    tile_off = row[:, None] * D + offs_d[None, :]  # (BLOCK_E, BLOCK_D)
    tile_mask = mask_e[:, None] & mask_d[None, :]
    return offs_e, mask_e, score, tile_off, tile_mask


@triton.jit
def _peer_fwd_kernel(
    x_ptr,  # (T, D)
    idx_ptr,  # (T, H*K) int64
    score_ptr,  # (T, H*K)
    u_ptr,  # (N*M, D)
    v_ptr,  # (N*M, D)
    g_ptr,  # (N*M, D) or a dummy when not GLU
    out_ptr,  # (T, D)
    pre_ptr,  # (T, E) fp32, saved for backward
    gpre_ptr,  # (T, E) fp32, saved for backward (GLU only)
    D,
    HK,
    E,
    M: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(x_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e, mask_e, score, tile_off, tile_mask = _entry_tile(
            idx_ptr, score_ptr, t, e0, HK, E, D, offs_d, mask_d, M, BLOCK_E
        )
        u = tl.load(u_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
        pre = tl.sum(u * x[None, :], axis=1)  # (BLOCK_E,)
        tl.store(pre_ptr + t * E + offs_e, pre, mask=mask_e)
        hidden = _act_fwd(pre, ACT)
        if GLU:
            gt = tl.load(g_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
            gpre = tl.sum(gt * x[None, :], axis=1)
            tl.store(gpre_ptr + t * E + offs_e, gpre, mask=mask_e)
            hidden = hidden * gpre
        coef = tl.where(mask_e, score * hidden, 0.0)
        vt = tl.load(v_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
        acc += tl.sum(coef[:, None] * vt, axis=0)
    tl.store(out_ptr + t * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _peer_bwd_token_kernel(
    x_ptr,  # (T, D)
    dout_ptr,  # (T, D)
    idx_ptr,  # (T, H*K) int64
    score_ptr,  # (T, H*K)
    u_ptr,  # (N*M, D)
    v_ptr,  # (N*M, D)
    g_ptr,  # (N*M, D) or dummy
    pre_ptr,  # (T, E) fp32
    gpre_ptr,  # (T, E) fp32 or dummy
    dx_ptr,  # (T, D) out
    dscore_ptr,  # (T, E) fp32 out: hidden * (v . dout) per sub-entry (summed over M by the caller)
    cu_ptr,  # (T, E) fp32 out: d loss / d pre (coefficient of x_t in du)
    cv_ptr,  # (T, E) fp32 out: score * hidden (coefficient of dout_t in dv)
    cg_ptr,  # (T, E) fp32 out: d loss / d gpre (GLU only)
    D,
    HK,
    E,
    M: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    dout = tl.load(dout_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e, mask_e, score, tile_off, tile_mask = _entry_tile(
            idx_ptr, score_ptr, t, e0, HK, E, D, offs_d, mask_d, M, BLOCK_E
        )
        pre = tl.load(pre_ptr + t * E + offs_e, mask=mask_e, other=0.0)
        vt = tl.load(v_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
        vd = tl.sum(vt * dout[None, :], axis=1)  # (BLOCK_E,) v_row . dout_t
        a = _act_fwd(pre, ACT)
        dpre = score * vd * _act_grad(pre, ACT)  # d loss / d pre
        if GLU:
            gpre = tl.load(gpre_ptr + t * E + offs_e, mask=mask_e, other=0.0)
            hidden = a * gpre
            dgpre = score * vd * a
            dpre = dpre * gpre
            tl.store(cg_ptr + t * E + offs_e, dgpre, mask=mask_e)
        else:
            hidden = a
        tl.store(dscore_ptr + t * E + offs_e, hidden * vd, mask=mask_e)
        tl.store(cu_ptr + t * E + offs_e, dpre, mask=mask_e)
        tl.store(cv_ptr + t * E + offs_e, score * hidden, mask=mask_e)
        dpre = tl.where(mask_e, dpre, 0.0)
        ut = tl.load(u_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
        dx += tl.sum(dpre[:, None] * ut, axis=0)
        if GLU:
            dgpre = tl.where(mask_e, dgpre, 0.0)
            gt = tl.load(g_ptr + tile_off, mask=tile_mask, other=0.0).to(tl.float32)
            dx += tl.sum(dgpre[:, None] * gt, axis=0)
    tl.store(dx_ptr + t * D + offs_d, dx.to(dx_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _peer_bwd_row_kernel(
    src_ptr,  # (T, D): x (for du, and dg) or dout (for dv)
    perm_ptr,  # (T*E,) int64 sub-entry ids sorted by table row
    sorted_ptr,  # (T*E,) int32/int64 table row of each sorted entry
    seg_start_ptr,  # (grid + 1,) int64 segment starts into perm; padded with T*E past the last segment
    n,  # T*E
    c_ptr,  # (T*E,) fp32 coefficient of src_t, in sorted order
    c2_ptr,  # (T*E,) fp32 second coefficient of src_t (TWO: GLU's dg with x), or dummy
    out_ptr,  # (N*M, D) dense gradient, or (R, D) compact rows when SPARSE
    out2_ptr,  # same as out_ptr (TWO), or dummy
    experts_ptr,  # (R // M,) int64 out: expert of each compact row group (SPARSE and EXPERTS), or dummy
    D,
    E,
    M: tl.constexpr,  # constexpr: the expert id divisions below compile to shifts (M = 1: nothing)
    TWO: tl.constexpr,
    SPARSE: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out_r = sum over row r's segment of c * src_t (and out2_r with c2), one program per row."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    start = tl.load(seg_start_ptr + r)
    end = tl.load(seg_start_ptr + r + 1)
    # The dense path's grid is the upper bound T*E (R is not on the host): programs past R find the
    # padding (start = end = T*E), store nothing and only load two boundaries.
    active = start < n
    mask_d = offs_d < tl.where(active, D, 0)
    row = tl.load(sorted_ptr + start, mask=active, other=0).to(tl.int64)  # the segment's table row
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # The segment is summed in its sorted order, BLOCK_S entries at a time: a fixed order, so the
    # result is the same on every run. Coefficients were permuted into sorted order beforehand, so the
    # loads of token ids and coefficients are contiguous and independent (one latency step, not two;
    # gathering them here through the ids took 0.967 ms against 0.935 on an H100).
    for p0 in range(start, end, BLOCK_S):
        offs_p = p0 + tl.arange(0, BLOCK_S)
        mask_p = offs_p < end
        tok = tl.load(perm_ptr + offs_p, mask=mask_p, other=0) // E  # (BLOCK_S,) token of each entry
        c = tl.load(c_ptr + offs_p, mask=mask_p, other=0.0)
        # src (8 MiB at the paper's size) is read once per entry and should stay in L2 while the
        # gradient rows stream past it: keep it, and let the written rows go first
        rows = tl.load(
            src_ptr + tok[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0,
            eviction_policy="evict_last",
        ).to(tl.float32)  # fmt: skip
        acc += tl.sum(c[:, None] * rows, axis=0)
        if TWO:
            c2 = tl.load(c2_ptr + offs_p, mask=mask_p, other=0.0)
            acc2 += tl.sum(c2[:, None] * rows, axis=0)
    if SPARSE:
        dst = r
        if EXPERTS:
            # compact rows come in whole experts (every unit of a touched expert is touched): the
            # group's first row names the expert for the sparse gradient's indices
            tl.store(experts_ptr + r // M, row // M, mask=active & (r % M == 0))
    else:
        dst = row
    tl.store(out_ptr + dst * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d, eviction_policy="evict_first")
    if TWO:
        tl.store(
            out2_ptr + dst * D + offs_d, acc2.to(out2_ptr.dtype.element_ty), mask=mask_d, eviction_policy="evict_first"
        )


# ----------------------------------------------------------------------------------------
# Launchers: flatten to 2-D, pick block sizes, allocate outputs.
# ----------------------------------------------------------------------------------------


def _blocks(D: int, E: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_D): all of D in one tile row, as many entries as TILE_ELEMENTS allows."""
    block_d = triton.next_power_of_2(D)
    block_e = max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(E), 64))
    return block_e, block_d


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


def peer_forward(x, indices, scores, u, v, g, activation):
    """Launch the fused forward.

    x (T, D); indices, scores (T, H, K); u, v, g (N, M, D).
    Returns out (T, D) in x's dtype, pre (T, H*K*M) fp32 and gpre (same, GLU) or None.
    """
    T, D = x.shape
    N, M, _ = u.shape
    HK = indices.shape[1] * indices.shape[2]
    E = HK * M
    out = torch.empty_like(x)
    pre = torch.empty((T, E), device=x.device, dtype=torch.float32)
    gpre = torch.empty_like(pre) if g is not None else pre
    block_e, block_d = _blocks(D, E)
    if T > 0:
        _peer_fwd_kernel[(T,)](
            x, indices, scores, u, v, g if g is not None else u, out, pre, gpre,
            D, HK, E, M=M, ACT=ACTIVATIONS[activation], GLU=g is not None,
            BLOCK_E=block_e, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )  # fmt: skip
    return out, pre, (gpre if g is not None else None)


def peer_backward_tokens(dout, x, indices, scores, u, v, g, pre, gpre, activation):
    """Pass A (token-major): dx (T, D) and per-sub-entry coefficients, each (T, E) fp32.

    Returns dx, dscore_sub, cu, cv, cg (cg is None without g).
    """
    T, D = x.shape
    N, M, _ = u.shape
    HK = indices.shape[1] * indices.shape[2]
    E = HK * M
    dx = torch.empty_like(x)
    dscore = torch.empty((T, E), device=x.device, dtype=torch.float32)
    cu = torch.empty_like(dscore)
    cv = torch.empty_like(dscore)
    cg = torch.empty_like(dscore) if g is not None else cu
    block_e, block_d = _blocks(D, E)
    if T > 0:
        _peer_bwd_token_kernel[(T,)](
            x, dout, indices, scores, u, v, g if g is not None else u, pre,
            gpre if gpre is not None else pre, dx, dscore, cu, cv, cg,
            D, HK, E, M=M, ACT=ACTIVATIONS[activation], GLU=g is not None,
            BLOCK_E=block_e, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )  # fmt: skip
    return dx, dscore, cu, cv, (cg if g is not None else None)


def sort_rows(indices: torch.Tensor, M: int, num_experts: int, deterministic: bool, num_rows: int | None = None):
    """Group sub-entries by table row, with no host sync.

    indices (T, H, K) -> perm (T*E,) sub-entry ids ordered by row; sorted_rows (T*E,) the row of each
    sorted entry (int32 where the (N*M, D) view fits, else int64); seg_start (S + 1,) int64 segment
    starts into perm, entry r < R the start of the r-th distinct row's segment (rows ascending), every
    later entry T*E. S = num_rows (R, when the caller knows it) or the upper bound T*E.
    """
    dev = indices.device
    rows = indices.reshape(-1)
    if M > 1:  # sub-entry id = position: (slot, unit) row-major
        rows = (rows.unsqueeze(-1) * M + torch.arange(M, device=dev)).reshape(-1)
    n = rows.numel()
    # int32 keys halve the radix sort's passes when the table fits.
    keys = rows.to(torch.int32) if num_experts * M < 2**31 else rows
    # Radix sort on CUDA is stable anyway; `stable=True` makes the within-row order (and so the fp32
    # summation order) a documented guarantee rather than an implementation detail.
    sorted_rows, perm = torch.sort(keys, stable=deterministic)
    is_start = torch.ones(n, device=dev, dtype=torch.bool)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=is_start[1:])
    # positions of the segment starts, padded with n: a fixed output size, so no host sync
    size = (n if num_rows is None else num_rows) + 1
    if n == 0:  # (nonzero_static of an empty CUDA tensor crashed before torch 2.9)
        return perm, sorted_rows, torch.zeros(size, device=dev, dtype=torch.int64)
    seg_start = torch.nonzero_static(is_start, size=size, fill_value=n).view(-1)
    return perm, sorted_rows, seg_start


class RowCount:
    """R read back to the host without stalling the GPU: an async copy started when R is computed.

    The forward starts it (``touched_row_count``), so in a model the copy has long finished when the
    backward reads it and ``get`` returns at once; at worst (one layer alone) the host waits until the GPU
    has finished that forward, never for the backward's own work.
    """

    def __init__(self, count: torch.Tensor) -> None:
        self.event = None
        if count.is_cuda:
            self.host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            self.host.copy_(count, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = count

    def get(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host[0])


def touched_row_count(indices: torch.Tensor, num_experts: int, M: int) -> torch.Tensor:
    """R, the number of distinct table rows that indices (T, H, K) touch, as a (1,) int64 device tensor.

    A bitmap over the N experts (3 small kernels, no sort, no host sync). The forward computes it and
    starts its copy to the host (``RowCount``), so the backward knows R, which sizes the sparse gradients,
    without draining the GPU queue.
    """
    mark = torch.zeros(num_experts, dtype=torch.bool, device=indices.device)
    mark.index_fill_(0, indices.reshape(-1), True)  # duplicates write the same value: order is free
    count = mark.sum().reshape(1)
    return count if M == 1 else count * M


def peer_backward_rows(
    dout, x, cu, cv, cg, perm, sorted_rows, seg_start, tables, num_rows=None, needs=(True, True, True)
):
    """Pass B (row-major): each touched row's gradient reduced over its segment and written once.

    cu, cv, cg: (T, E) fp32 coefficients from pass A (cg None without g); perm, sorted_rows, seg_start
    from ``sort_rows``; tables: (u, v, g-or-None), each (N, M, D); num_rows: None for dense gradients,
    or R for sparse ones (``sort_rows`` must have been given the same R); needs: which of (u, v, g) want a
    gradient. Returns (du, dv, dg), None where not wanted: dense (N, M, D) tensors of zeros plus the
    written rows (no host sync: the grid is the upper bound T*E), or sparse COO tensors of the R // M
    touched experts' (M, D) rows.
    """
    T, D = x.shape
    N, M, _ = tables[0].shape
    E = cu.shape[1]
    n = T * E
    sparse_grad = num_rows is not None
    if sparse_grad and seg_start.numel() != num_rows + 1:  # compact rows need exactly R segments
        raise ValueError(f"peer_backward_rows: {seg_start.numel() - 1} segments for R={num_rows} touched rows")
    wanted = [tab is not None and need for tab, need in zip(tables, needs, strict=True)]
    # (T*E,) coefficients in sorted order, for the wanted tables only
    coefs = [c.view(-1)[perm] if want else None for c, want in zip((cu, cv, cg), wanted, strict=True)]
    grid = seg_start.numel() - 1  # R (sparse) or T*E (dense)
    shape = (grid, D) if sparse_grad else (N * M, D)
    alloc = torch.empty if sparse_grad else torch.zeros  # dense: zeros plus one write per touched row
    grads = [
        alloc(shape, device=x.device, dtype=tab.dtype) if want else None
        for tab, want in zip(tables, wanted, strict=True)
    ]
    # the sparse gradient's expert ids, written by the first launch (dense: a dummy the kernel never touches)
    experts = torch.empty(grid // M, device=x.device, dtype=torch.int64) if sparse_grad else perm
    block_d = triton.next_power_of_2(D)
    block_s = max(1, min(ROW_BLOCK_S, TILE_ELEMENTS // block_d))
    # One launch per source: x -> du and/or dg, then dout -> dv (each only if wanted). Each keeps an 8 MiB
    # source in L2 instead of 16 (see ROW_NUM_WARPS for the measurements).
    by_source = [
        (x, [(coefs[i], grads[i]) for i in (0, 2) if wanted[i]]),
        (dout, [(coefs[1], grads[1])] if wanted[1] else []),
    ]
    launches = [(src, pairs) for src, pairs in by_source if pairs and grid > 0]
    for i, (src, pairs) in enumerate(launches):
        (c, out), (c2, out2) = pairs[0], pairs[-1]
        _peer_bwd_row_kernel[(grid,)](
            src, perm, sorted_rows, seg_start, n, c, c2, out, out2, experts, D, E,
            M=M, TWO=len(pairs) == 2, SPARSE=sparse_grad, EXPERTS=i == 0, BLOCK_S=block_s, BLOCK_D=block_d,
            num_warps=ROW_NUM_WARPS,
        )  # fmt: skip
    if not sparse_grad:
        return tuple(gr.view(N, M, D) if gr is not None else None for gr in grads)
    # Compact rows: ascending, and every unit of a touched expert is touched, so the buffers view as
    # (R // M, M, D) experts in the order of ``experts``.
    return tuple(
        torch.sparse_coo_tensor(
            experts.unsqueeze(0), gr.view(grid // M, M, D), (N, M, D), is_coalesced=True, check_invariants=False
        )
        if gr is not None
        else None
        for gr in grads
    )


# ----------------------------------------------------------------------------------------
# Autograd Function
# ----------------------------------------------------------------------------------------


class PEERExpertsFunction(torch.autograd.Function):
    """Fused PEER experts; inputs already contiguous and checked by ``peer_experts_triton``."""

    @staticmethod
    def forward(ctx, x, indices, scores, u, v, g, activation, deterministic, sparse_grad, count_rows):
        # Sparse grads are sized by R: with ``count_rows`` (a backward will follow) it is counted now.
        # The caller decides: grad mode is always off inside forward, and needs_input_grad ignores it.
        ctx.row_count = RowCount(touched_row_count(indices, u.shape[0], u.shape[1])) if count_rows else None
        out, pre, gpre = peer_forward(x, indices, scores, u, v, g, activation)
        ctx.save_for_backward(x, indices, scores, u, v, g, pre, gpre)
        ctx.activation = activation
        ctx.deterministic = deterministic
        ctx.sparse_grad = sparse_grad
        return out

    @staticmethod
    def backward(ctx, dout):
        x, indices, scores, u, v, g, pre, gpre = ctx.saved_tensors
        dout = dout.contiguous()
        T, H, K = indices.shape
        M = u.shape[1]
        need_tables = any(ctx.needs_input_grad[3:6])
        dx, dscore, cu, cv, cg = peer_backward_tokens(dout, x, indices, scores, u, v, g, pre, gpre, ctx.activation)
        dscores = (dscore if M == 1 else dscore.view(T, H, K, M).sum(-1)).view(T, H, K).to(scores.dtype)
        du = dv = dg = None
        if need_tables:
            num_rows = None
            if ctx.sparse_grad:  # sized by R, which the forward counted and sent to the host
                # (counted here only if the forward did not expect a backward, e.g. a double backward)
                row_count = ctx.row_count or RowCount(touched_row_count(indices, u.shape[0], M))
                num_rows = row_count.get()
            perm, sorted_rows, seg_start = sort_rows(indices, M, u.shape[0], ctx.deterministic, num_rows)
            du, dv, dg = peer_backward_rows(
                dout, x, cu, cv, cg, perm, sorted_rows, seg_start, (u, v, g), num_rows, ctx.needs_input_grad[3:6]
            )
        return dx, None, dscores, du, dv, dg, None, None, None, None


def _fallback_reason(x, indices, u) -> str | None:
    if x.shape[1] > MAX_FUSED_DIM:
        return f"model width D={x.shape[1]} exceeds MAX_FUSED_DIM={MAX_FUSED_DIM}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not one of float32/float16/bfloat16"
    return None


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Log once per distinct reason."""
    logger.warning("peer_experts_triton: using the torch reference because %s", reason)


def peer_experts_triton(x, indices, scores, u, v, activation, g=None, deterministic=False, sparse_grad=False):
    """PEER expert computation with the fused Triton kernels.

    Args:
        x: (T, D) token inputs.
        indices: (T, H, K) int64 flat expert ids in [0, N).
        scores: (T, H, K) mixing weights (already softmaxed / sigmoided).
        u, v, g: (N, M, D) expert tables (g only for gated experts).
        activation: "gelu" (exact erf) | "relu" | "silu".
        deterministic: stable sort of the backward's row segments (bitwise-reproducible gradients).
        sparse_grad: return the tables' gradients as sparse COO tensors over the touched experts
            instead of dense (N, M, D) tensors (skips zeroing the tables' worth of gradient memory).

    Returns:
        out (T, D) in x's dtype (fp32 accumulation).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: got {activation!r}; allowed: {' | '.join(ACTIVATIONS)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"indices: got dtype {indices.dtype}; must be torch.int64")
    reason = _fallback_reason(x, indices, u)
    if reason is not None:
        _warn_fallback(reason)
        from llm.ops.peer_reference import peer_experts_reference

        return peer_experts_reference(x, indices, scores, u, v, activation, g=g)
    tables = [t for t in (u, v, g) if t is not None]
    count_rows = sparse_grad and torch.is_grad_enabled() and any(t.requires_grad for t in tables)
    return PEERExpertsFunction.apply(
        x.contiguous(), indices.contiguous(), scores.contiguous(), u.contiguous(), v.contiguous(),
        g.contiguous() if g is not None else None, activation, deterministic, sparse_grad, count_rows,
    )  # fmt: skip
