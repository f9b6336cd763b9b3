"""Row-sparse (lazy) AdamW for the PEER expert tables.

A training step touches only the table rows its tokens selected (about 39% of N = 1024^2 rows at
T = 4096, h = 8, k = 16: 1 - e^{-T*h*k/N}), yet a dense AdamW reads and writes all of p, m, v
(GUIDE §3: 23 ms over both tables on an H100). This optimiser updates only the touched rows.

Semantics (the same lazy rule as ``torch.optim.SparseAdam``, plus decoupled weight decay):
- touched row r (its gradient row is present):
      p_r *= 1 - lr * weight_decay
      m_r  = beta1 * m_r + (1 - beta1) * g_r
      v_r  = beta2 * v_r + (1 - beta2) * g_r^2
      p_r -= lr * (m_r / (1 - beta1^s)) / (sqrt(v_r / (1 - beta2^s)) + eps)
  with s the parameter's global step count (bias correction does not track per-row ages);
- untouched row: p, m and v are left exactly as they are. Its moments do not decay and it gets no
  weight decay, so a row's total decay is proportional to how often it is selected, and a row coming
  back after a long rest resumes with its old (not decayed) moments.
With every row touched every step this equals ``torch.optim.AdamW`` (tested).

Which rows are touched: a sparse COO gradient (``peer_experts_triton(..., sparse_grad=True)``) lists
them; a dense gradient is scanned for rows with any non-zero (a full read of the gradient, so the
sparse form is the fast path; a row whose gradient is exactly zero counts as untouched).
On CUDA (and under TRITON_INTERPRET) the update is one fused Triton kernel over the touched rows;
elsewhere it is the torch reference ``row_adamw_reference_``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Elements of a row handled by one program (rows are D*M wide; D = 1024 at the paper's size).
BLOCK_W = 1024


@triton.jit
def _row_adamw_kernel(
    p_ptr,  # (N, W) parameter rows
    g_ptr,  # (R, W) gradient of the touched rows
    m_ptr,  # (N, W) first moment
    v_ptr,  # (N, W) second moment
    rows_ptr,  # (R,) int64 touched row ids
    W,
    lr,
    beta1,
    beta2,
    eps,
    decay,  # 1 - lr * weight_decay
    bc1,  # 1 - beta1^step
    bc2_sqrt,  # sqrt(1 - beta2^step)
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < W
    row = tl.load(rows_ptr + r)
    dst = row * W + offs
    g = tl.load(g_ptr + r * W + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p * decay - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(p_ptr + dst, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + dst, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + dst, v.to(v_ptr.dtype.element_ty), mask=mask)


def row_adamw_triton_(p2d, rows, g2d, m2d, v2d, *, lr, beta1, beta2, eps, weight_decay, step):
    """Fused in-place update of rows ``rows`` (R,) of p2d, m2d, v2d (N, W) with gradient rows g2d (R, W)."""
    R, W = g2d.shape
    if R == 0:
        return
    grid = (R, triton.cdiv(W, BLOCK_W))
    _row_adamw_kernel[grid](
        p2d, g2d.contiguous(), m2d, v2d, rows, W, lr, beta1, beta2, eps, 1.0 - lr * weight_decay,
        1.0 - beta1**step, math.sqrt(1.0 - beta2**step), BLOCK=BLOCK_W, num_warps=4,
    )  # fmt: skip


def row_adamw_reference_(p2d, rows, g2d, m2d, v2d, *, lr, beta1, beta2, eps, weight_decay, step):
    """Torch reference of ``row_adamw_triton_`` (same arguments, same semantics, fp32 math)."""
    g = g2d.float()
    p = p2d.index_select(0, rows).float()  # (R, W)
    m = m2d.index_select(0, rows).float()
    v = v2d.index_select(0, rows).float()
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - beta2**step)
    p = p * (1 - lr * weight_decay) - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
    p2d.index_copy_(0, rows, p.to(p2d.dtype))
    m2d.index_copy_(0, rows, m.to(m2d.dtype))
    v2d.index_copy_(0, rows, v.to(v2d.dtype))


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (R,) int64, gradient rows (R, W)) of a sparse COO or dense gradient of shape (N, ...)."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1:  # rows of values must be whole parameter rows
            raise ValueError(
                f"RowSparseAdamW: a sparse gradient must be sparse in its first dimension only (sparse_dim 1), "
                f"got sparse_dim {grad.sparse_dim()}"
            )
        rows = grad._indices()[0]
        # Autograd drops the coalesced flag of the kernel's (sorted, distinct) rows; checking them is
        # one pass over R ints, where coalesce() would sort and copy all the (R, W) values.
        if not grad.is_coalesced() and bool((rows[1:] > rows[:-1]).all()):
            grad._coalesced_(True)
        grad = grad.coalesce()  # sums duplicate rows left by gradient accumulation; else a no-op
        return grad._indices()[0], grad._values().reshape(grad._indices().shape[1], -1)
    g2d = grad.reshape(grad.shape[0], -1)
    rows = (g2d != 0).any(dim=1).nonzero().squeeze(1)
    return rows, g2d.index_select(0, rows)


def sparse_grad_sq_norm(grad: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of a dense or sparse COO gradient (``clip_grad_norm_`` rejects sparse ones)."""
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.values().float().pow(2).sum()
    return grad.float().pow(2).sum()


class RowSparseAdamW(torch.optim.Optimizer):
    """Lazy AdamW over the rows of (N, ...) parameters (see the module docstring for the semantics).

    Args:
        params: parameters of shape (N, ...); row r is ``p[r]``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay only on touched rows).
        state_dtype: dtype of the moments (None = the parameter's dtype promoted to at least fp32;
            torch.bfloat16 halves the optimiser's memory traffic at some precision cost).
        use_triton: None = the fused kernel on CUDA or under TRITON_INTERPRET, else the torch reference.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, state_dtype=None,
                 use_triton=None):  # fmt: skip
        if lr < 0:
            raise ValueError(f"lr: got {lr}; must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: got {betas}; each must be in [0, 1)")
        if eps <= 0:
            raise ValueError(f"eps: got {eps}; must be > 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: got {weight_decay}; must be >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.use_triton = use_triton

    def _kernel(self, p: torch.Tensor):
        use = self.use_triton
        if use is None:
            use = p.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
        return row_adamw_triton_ if use else row_adamw_reference_

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded moments to each parameter's dtype; put them back in ``state_dtype`` so a
        resumed run keeps the moments' precision (and its updates) of the uninterrupted one."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                # the dtype step() creates them in (bf16 parameters keep fp32 moments by default)
                dtype = self.state_dtype or torch.promote_types(p.dtype, torch.float32)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].to(dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    dtype = self.state_dtype or torch.promote_types(p.dtype, torch.float32)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
                state["step"] += 1
                rows, g2d = touched_rows(p.grad)
                n = p.shape[0]
                self._kernel(p)(
                    p.view(n, -1), rows, g2d, state["exp_avg"].view(n, -1), state["exp_avg_sq"].view(n, -1),
                    lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=state["step"],
                )  # fmt: skip
        return loss
