"""llm/ops/triton_query_norm.py against its torch reference (Triton interpreter on CPU, or a GPU)."""

import os

import pytest
import torch
from torch import nn

from llm.ops import triton_query_norm as tqn

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def grads(fn, x, weight, bias, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    x_, w_ = leaves[0], leaves[1] if weight is not None else None
    b_ = leaves[-1] if bias is not None else None
    y = fn(x_, w_, b_, 1e-5)
    y.backward(dy)
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,affine", [(70, 128, True), (5, 24, True), (9, 16, False)])
def test_fused_norm_equals_the_reference(dtype, rows, width, affine):
    """Output (fp32) and the gradients of x, weight and bias equal the fp32 reference; a ragged last
    block of rows and a width that is not a power of two are masked."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, width, generator=gen) * 3 + 1).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype).to(DEVICE) if affine else None
    bias = (0.1 * torch.randn(width, generator=gen)).to(dtype).to(DEVICE) if affine else None
    dy = torch.randn(rows, width, generator=gen).to(DEVICE)
    fused = lambda *a: tqn.query_layer_norm(*a, kernel="triton")  # noqa: E731
    y, got = grads(fused, x, weight, bias, dy)
    y_ref, want = grads(tqn.query_layer_norm_reference, x, weight, bias, dy)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # dx is rounded to x's dtype; weight/bias gradients are fp32 sums rounded to the parameters' dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * w.abs().max().item())


def test_fused_norm_matches_nn_layernorm_and_is_reproducible():
    """The kernel path has nn.LayerNorm's semantics (biased variance, eps inside the root) and its
    parameter gradients are bitwise the same on every run (partial sums in a fixed order)."""
    gen = torch.Generator().manual_seed(1)
    norm = nn.LayerNorm(32, eps=1e-3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
    norm = norm.to(DEVICE)
    x = torch.randn(3, 11, 32, generator=gen).to(DEVICE)
    want = norm(x)
    runs = []
    for _ in range(2):
        norm.zero_grad()
        got = tqn.query_layer_norm(x, norm.weight, norm.bias, norm.eps, kernel="triton")
        got.pow(2).sum().backward()
        runs.append((norm.weight.grad.clone(), norm.bias.grad.clone()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_only_the_needed_gradients_are_computed():
    x = torch.randn(4, 16).to(DEVICE).requires_grad_()
    weight = torch.ones(16, device=DEVICE)  # no grad wanted
    tqn.query_layer_norm(x, weight, None, 1e-5, kernel="triton").sum().backward()
    assert x.grad is not None and weight.grad is None


def test_kernel_choice_follows_the_peer_kernel_setting(monkeypatch):
    """"torch" never runs the kernels; "auto" runs them on CUDA only; wide rows use the reference."""
    calls = []
    monkeypatch.setattr(tqn._QueryLayerNorm, "apply", lambda *a: calls.append(a) or tqn.query_layer_norm_reference(*a))
    x = torch.randn(2, 8, device=DEVICE)
    tqn.query_layer_norm(x, None, None, 1e-5, kernel="torch")
    tqn.query_layer_norm(x, None, None, 1e-5, kernel="auto")
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
    monkeypatch.setattr(tqn, "MAX_FUSED_WIDTH", 4)
    tqn.query_layer_norm(x, None, None, 1e-5, kernel="triton")
    assert len(calls) == (1 if DEVICE == "cuda" else 0)
