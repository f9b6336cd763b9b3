"""Torch reference of the PEER expert computation: the CPU path and the oracle of the Triton kernels.

For each token t, head h and retrieved expert i = indices[t, h, k] (tables u, v, g of shape (N, M, D)):

    pre_thkm  = u[i, m] . x_t                      gate_thkm = g[i, m] . x_t      (GLU only)
    hid_thkm  = act(pre_thkm)   (* gate_thkm)
    out_t     = sum_{h,k,m} scores_thk * hid_thkm * v[i, m]

Memory: tokens are processed in chunks so that no gathered (chunk, H, K, M, D) tensor exceeds
``max_gather_bytes`` (counted in the fp32 compute dtype; a chunk is at least one token). The
``autograd.Function`` saves only x, indices and scores and re-gathers rows chunk by chunk in backward;
table gradients are accumulated with ``index_add_`` into one (N, M, D) buffer (plain autograd through
``u[idx]`` would allocate a dense table-sized zero tensor per chunk). Peak extra memory of forward +
backward, beyond inputs, output and the gradients themselves: at most 4 gathered-size tensors at once
(5 with GLU), i.e. <= 5 * max_gather_bytes, plus O(T*H*K*M) scalars. tests/ops/test_peer_reference.py
measures it.

Shape legend: T tokens, C tokens of one chunk, D model width, H heads, K experts per head, N experts,
M expert hidden size, E = H*K*M gathered rows per token.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

ACTIVATIONS = ("gelu", "relu", "silu")


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast so matmuls run in the dtype their inputs were cast to (no-op on meta etc.)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _act_and_grad(pre: Tensor, activation: str, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """act(pre) and, when asked, d act / d pre (closed forms; gelu is the exact erf form)."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0))))
        out = pre * cdf
        grad = cdf + pre * torch.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi)) if need_grad else None
    elif activation == "relu":
        out = torch.relu(pre)
        grad = (pre > 0).to(pre.dtype) if need_grad else None
    elif activation == "silu":
        sig = torch.sigmoid(pre)
        out = pre * sig
        grad = sig * (1.0 + pre * (1.0 - sig)) if need_grad else None
    else:
        raise ValueError(f"activation: got {activation!r}; allowed: {' | '.join(ACTIVATIONS)}")
    return out, grad


def _chunk_tokens(num_heads: int, k: int, hidden: int, dim: int, elem_bytes: int, max_gather_bytes: int) -> int:
    """Tokens per chunk so that one gathered (C, H, K, M, D) tensor stays within max_gather_bytes."""
    per_token = num_heads * k * hidden * dim * elem_bytes
    return max(1, max_gather_bytes // per_token)


def _gather(table: Tensor, ids_c: Tensor, acc: torch.dtype) -> Tensor:
    """Rows table[ids] as (C*H*K, M*D) in the compute dtype."""
    return table.reshape(table.shape[0], -1).index_select(0, ids_c).to(acc)


class _PEERExpertsFunction(torch.autograd.Function):
    """Chunked forward; backward re-gathers rows per chunk instead of saving them."""

    @staticmethod
    def forward(ctx, x, indices, scores, u, v, g, activation, max_gather_bytes):
        T, D = x.shape
        _, H, K = indices.shape
        N, M, _ = u.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        chunk = _chunk_tokens(H, K, M, D, torch.finfo(acc).bits // 8, max_gather_bytes)
        out = torch.empty(T, D, dtype=x.dtype, device=x.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            C = t1 - t0
            x_CD = x[t0:t1].to(acc)
            ids = indices[t0:t1].reshape(-1)
            pre_CE = torch.bmm(_gather(u, ids, acc).view(C, H * K * M, D), x_CD.unsqueeze(-1)).squeeze(-1)
            hid_CE, _ = _act_and_grad(pre_CE, activation, need_grad=False)
            if g is not None:
                hid_CE = hid_CE * torch.bmm(_gather(g, ids, acc).view(C, H * K * M, D), x_CD.unsqueeze(-1)).squeeze(-1)
            coef_CE = (hid_CE.view(C, H * K, M) * scores[t0:t1].reshape(C, H * K, 1).to(acc)).view(C, 1, H * K * M)
            out[t0:t1] = torch.bmm(coef_CE, _gather(v, ids, acc).view(C, H * K * M, D)).view(C, D).to(x.dtype)
        ctx.save_for_backward(x, indices, scores, u, v, g)
        ctx.activation = activation
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, indices, scores, u, v, g = ctx.saved_tensors
        need_x, _, need_s, need_u, need_v, need_g = ctx.needs_input_grad[:6]
        T, D = x.shape
        _, H, K = indices.shape
        N, M, _ = u.shape
        E = H * K * M
        acc = torch.promote_types(x.dtype, torch.float32)
        grad_x = torch.zeros(T, D, dtype=acc, device=x.device) if need_x else None
        grad_s = torch.zeros(T, H, K, dtype=acc, device=x.device) if need_s else None
        # Row-sparse accumulation into one dense buffer per table (index_add_, no per-chunk table copies).
        grad_u = torch.zeros(N, M * D, dtype=acc, device=u.device) if need_u else None
        grad_v = torch.zeros(N, M * D, dtype=acc, device=v.device) if need_v else None
        grad_g = torch.zeros(N, M * D, dtype=acc, device=g.device) if need_g else None
        for t0 in range(0, T, ctx.chunk):
            t1 = min(T, t0 + ctx.chunk)
            C = t1 - t0
            x_CD = x[t0:t1].to(acc)
            dout_CD = grad_out[t0:t1].to(acc)
            s_CE = scores[t0:t1].reshape(C, H * K, 1).to(acc).expand(C, H * K, M).reshape(C, E)
            ids = indices[t0:t1].reshape(-1)

            u_rows = _gather(u, ids, acc).view(C, E, D)
            pre_CE = torch.bmm(u_rows, x_CD.unsqueeze(-1)).squeeze(-1)
            act_CE, dact_CE = _act_and_grad(pre_CE, ctx.activation, need_grad=True)
            gate_CE = None
            if g is not None:
                gate_CE = torch.bmm(_gather(g, ids, acc).view(C, E, D), x_CD.unsqueeze(-1)).squeeze(-1)
            hid_CE = act_CE if gate_CE is None else act_CE * gate_CE

            # w = v_i . dout: how the output gradient projects on each expert's output row.
            v_rows = _gather(v, ids, acc).view(C, E, D)
            w_CE = torch.bmm(v_rows, dout_CD.unsqueeze(-1)).squeeze(-1)
            del v_rows
            if need_v:
                grad_v.index_add_(0, ids, ((s_CE * hid_CE).unsqueeze(-1) * dout_CD.unsqueeze(1)).view(C * H * K, M * D))
            if need_s:
                grad_s[t0:t1] = (hid_CE * w_CE).view(C, H, K, M).sum(-1)

            dhid_CE = s_CE * w_CE
            dpre_CE = dhid_CE * dact_CE if gate_CE is None else dhid_CE * gate_CE * dact_CE
            if need_x:
                grad_x[t0:t1] = torch.bmm(dpre_CE.unsqueeze(1), u_rows).squeeze(1)
            del u_rows
            if need_u:
                grad_u.index_add_(0, ids, (dpre_CE.unsqueeze(-1) * x_CD.unsqueeze(1)).view(C * H * K, M * D))
            if g is not None:
                dgate_CE = dhid_CE * act_CE
                if need_x:
                    g_rows = _gather(g, ids, acc).view(C, E, D)
                    grad_x[t0:t1] += torch.bmm(dgate_CE.unsqueeze(1), g_rows).squeeze(1)
                    del g_rows
                if need_g:
                    grad_g.index_add_(0, ids, (dgate_CE.unsqueeze(-1) * x_CD.unsqueeze(1)).view(C * H * K, M * D))

        def cast(grad, like):
            return None if grad is None else grad.view(like.shape).to(like.dtype)

        return (
            cast(grad_x, x),
            None,
            cast(grad_s, scores),
            cast(grad_u, u),
            cast(grad_v, v),
            cast(grad_g, g),
            None,
            None,
        )


def peer_experts_reference(
    x: Tensor,
    indices: Tensor,
    scores: Tensor,
    u: Tensor,
    v: Tensor,
    activation: str,
    g: Tensor | None = None,
    max_gather_bytes: int = 256 * 2**20,
) -> Tensor:
    """Mix the retrieved experts' outputs (see the module docstring for the maths).

    Args:
        x: (T, D) token inputs.
        indices: (T, H, K) int64 flat expert ids in [0, N).
        scores: (T, H, K) mixing weights (already softmax/sigmoid).
        u, v: (N, M, D) expert input and output tables; g: optional (N, M, D) gate table (GLU experts).
        activation: "gelu" (exact erf) | "relu" | "silu".
        max_gather_bytes: bound on one gathered (chunk, H, K, M, D) fp32 tensor.

    Returns:
        (T, D) in x's dtype, accumulated in fp32 (fp64 for fp64 inputs). Differentiable w.r.t. x,
        scores, u, v and g (first order only).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: got {activation!r}; allowed: {' | '.join(ACTIVATIONS)}")
    if x.dim() != 2 or indices.dim() != 3 or indices.shape != scores.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"peer_experts_reference: expected x (T, D), indices and scores (T, H, K); got x {tuple(x.shape)}, "
            f"indices {tuple(indices.shape)}, scores {tuple(scores.shape)}"
        )
    if indices.dtype != torch.int64:
        raise ValueError(f"peer_experts_reference: indices must be int64, got {indices.dtype}")
    for name, table in (("u", u), ("v", v), ("g", g)):
        if table is not None and (table.dim() != 3 or table.shape != u.shape or table.shape[-1] != x.shape[-1]):
            raise ValueError(
                f"peer_experts_reference: table {name} must be (N, M, D={x.shape[-1]}) like u {tuple(u.shape)}; "
                f"got {tuple(table.shape)}"
            )
    if max_gather_bytes < 1:
        raise ValueError(f"max_gather_bytes: got {max_gather_bytes}; must be >= 1")
    # fp32 accumulation even when an outer autocast region would run the matmuls in bf16.
    with autocast_off(x.device.type):
        return _PEERExpertsFunction.apply(x, indices, scores, u, v, g, activation, max_gather_bytes)
