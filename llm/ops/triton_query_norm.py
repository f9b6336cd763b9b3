"""PEER's query LayerNorm fused with the cast to fp32 that retrieval needs: one Triton kernel each way.

Retrieval scores queries in fp32 (``llm/models/experts.py``). With ``nn.LayerNorm`` in the model's dtype
(bf16) followed by ``.float()``, one step ran five kernels on the query path: the norm, the cast, the
cast's backward, the norm's input gradient and its weight/bias gradient. At the paper's size (32768 rows
of 128) the last alone took 0.094 ms on an H100 and the five 0.18 ms (benchmarks/RESULTS.md). Here the
forward reads x in its dtype and writes the normalised rows in fp32 (never rounded to bf16); the backward
writes dx in x's dtype and one partial weight/bias gradient per program, summed afterwards in a fixed
order (no atomics: the bits do not change between runs).

Semantics are ``F.layer_norm(x.float(), (Q,), weight.float(), bias.float(), eps)`` (biased variance,
as ``nn.LayerNorm``); ``query_layer_norm_reference`` is that expression.

Shape legend: R rows (tokens x heads), Q normalised width.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

try:  # Triton is an optional dependency (the dev extra, or a CUDA install of torch).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

# Widest row the kernels keep in registers (one program holds BLOCK_R whole rows).
MAX_FUSED_WIDTH = 4096
# Elements of one program's (BLOCK_R, BLOCK_Q) tile: 32 rows of 128 at the paper's size, 1024 programs.
_TILE_ELEMENTS = 4096
# Most backward programs, each writing one partial weight/bias gradient (2 x Q fp32): bounds that buffer
# (1 MiB at Q = 128) when rows are many or wide; programs then loop over several row blocks.
_MAX_PARTIALS = 1024


def query_layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim, computed and returned in at least fp32 (x, weight and bias upcast)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = weight.to(dtype) if weight is not None else None
    b = bias.to(dtype) if bias is not None else None
    return F.layer_norm(x.to(dtype), x.shape[-1:], w, b, eps)


if triton is not None:

    @triton.jit
    def _norm_fwd_kernel(
        x_ptr,  # (R, Q) any float dtype
        w_ptr,  # (Q,) or dummy
        b_ptr,  # (Q,) or dummy
        y_ptr,  # (R, Q) fp32 out
        mean_ptr,  # (R,) fp32 out
        rstd_ptr,  # (R,) fp32 out
        R,
        Q,
        eps,
        HAS_W: tl.constexpr,
        HAS_B: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_Q)
        row_ok = rows < R
        col_ok = cols < Q
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * Q + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / Q
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / Q + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, y, mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _norm_bwd_kernel(
        x_ptr,  # (R, Q) any float dtype
        w_ptr,  # (Q,) or dummy
        dy_ptr,  # (R, Q) fp32
        mean_ptr,  # (R,) fp32
        rstd_ptr,  # (R,) fp32
        dx_ptr,  # (R, Q) out, x's dtype
        part_ptr,  # (2, Q, programs) fp32 out: column pid = this program's rows' sums of dy * xhat, of dy
        R,
        Q,
        blocks,  # cdiv(R, BLOCK_R) row blocks, program pid taking pid, pid + programs, ...
        programs,
        HAS_W: tl.constexpr,
        PARTIALS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_Q: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_Q)
        col_ok = cols < Q
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        db = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for block in range(pid, blocks, programs):  # a fixed order per program: deterministic partials
            rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < R
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * Q + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy
            if HAS_W:
                wdy = dy * w[None, :]
            # d xhat -> dx through the mean and the variance: rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy))
            c1 = tl.sum(xhat * wdy, axis=1) / Q
            c2 = tl.sum(wdy, axis=1) / Q
            dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if PARTIALS:
                dw += tl.sum(dy * xhat, axis=0)
                db += tl.sum(dy, axis=0)
        if PARTIALS:
            col_offs = cols.to(tl.int64) * programs + pid
            tl.store(part_ptr + col_offs, dw, mask=col_ok)
            tl.store(part_ptr + Q * programs + col_offs, db, mask=col_ok)


def _launch(Q: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_Q) for rows of width Q (4 warps: one tile is _TILE_ELEMENTS elements)."""
    block_q = triton.next_power_of_2(Q)
    return max(1, _TILE_ELEMENTS // block_q), block_q


class _QueryLayerNorm(torch.autograd.Function):
    """y (R, Q) fp32 = LayerNorm(x (R, Q)); saves x (in its dtype), the weight, and mean and rstd (R fp32
    each). Differentiable once (the backward kernels build no graph)."""

    @staticmethod
    def forward(ctx, x_RQ: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        R, Q = x_RQ.shape
        y = torch.empty(R, Q, device=x_RQ.device, dtype=torch.float32)
        mean = torch.empty(R, device=x_RQ.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_r, block_q = _launch(Q)
        if R > 0:
            _norm_fwd_kernel[(triton.cdiv(R, block_r),)](
                x_RQ, weight if weight is not None else y, bias if bias is not None else y, y, mean, rstd,
                R, Q, eps, HAS_W=weight is not None, HAS_B=bias is not None,
                BLOCK_R=block_r, BLOCK_Q=block_q, num_warps=4,
            )  # fmt: skip
        ctx.save_for_backward(x_RQ, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RQ: Tensor):
        x_RQ, weight, mean, rstd = ctx.saved_tensors
        R, Q = x_RQ.shape
        dy_RQ = dy_RQ.float().contiguous()
        block_r, block_q = _launch(Q)
        blocks = triton.cdiv(R, block_r)
        programs = max(1, min(blocks, _MAX_PARTIALS))
        dx = torch.empty_like(x_RQ)
        partials = any(ctx.needs_input_grad[1:3])
        # (2, Q, programs) partial sums of the weight's and the bias's gradient, every program writing its
        # column, then one sum along the contiguous dim (0.004 ms at the paper's size on an H100; column
        # sums of a (programs, Q) layout, one per parameter, took about 0.014)
        parts = torch.empty(2, Q, programs if partials else 0, device=x_RQ.device, dtype=torch.float32)
        if R > 0:
            _norm_bwd_kernel[(programs,)](
                x_RQ, weight if weight is not None else dy_RQ, dy_RQ, mean, rstd, dx, parts, R, Q, blocks, programs,
                HAS_W=weight is not None, PARTIALS=partials, BLOCK_R=block_r, BLOCK_Q=block_q, num_warps=4,
            )  # fmt: skip
        sums = parts.sum(2) if partials else None
        dw = sums[0].to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = sums[1].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), dw, db, None


def query_layer_norm_applies(x: Tensor) -> bool:
    """True where the kernels can run: a Triton install, CUDA (or the interpreter on CPU tensors),
    fp32/bf16/fp16 rows no wider than ``MAX_FUSED_WIDTH``."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        triton is not None
        and on_device
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and 0 < x.shape[-1] <= MAX_FUSED_WIDTH
    )


def query_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, kernel: str = "auto") -> Tensor:
    """LayerNorm over the last dim of x [..., Q], returned in at least fp32.

    ``kernel`` as ``PEERConfig.kernel``: "auto" runs the fused kernels on CUDA, "triton" wherever they
    apply (the interpreter too), "torch" never; elsewhere ``query_layer_norm_reference`` (the same values
    up to fp32 rounding).
    """
    use = kernel == "triton" or (kernel == "auto" and x.is_cuda)
    if not (use and query_layer_norm_applies(x)):
        return query_layer_norm_reference(x, weight, bias, eps)
    Q = x.shape[-1]
    return _QueryLayerNorm.apply(x.reshape(-1, Q).contiguous(), weight, bias, eps).view(*x.shape[:-1], Q)
