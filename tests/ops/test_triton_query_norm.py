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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows,width,params",
    [(70, 128, "both"), (5, 24, "both"), (9, 16, "none"), (6, 20, "weight"), (3, 4096, "both")],
    ids=["ragged-rows", "width-24", "no-affine", "weight-only", "one-row-per-tile"],
)
def test_fused_norm_equals_the_reference(dtype, rows, width, params):
    """Output (fp32) and the gradients of x, weight and bias equal the fp32 reference; a ragged last
    block of rows, a width that is not a power of two and a tile of one row are masked right."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, width, generator=gen) * 3 + 1).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(width, generator=gen)).to(dtype).to(DEVICE) if params != "none" else None
    bias = (0.1 * torch.randn(width, generator=gen)).to(dtype).to(DEVICE) if params == "both" else None
    dy = torch.randn(rows, width, generator=gen).to(DEVICE)
    fused = lambda *a: tqn.query_layer_norm(*a, kernel="triton")  # noqa: E731
    y, got = grads(fused, x, weight, bias, dy)
    y_ref, want = grads(tqn.query_layer_norm_reference, x, weight, bias, dy)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # dx is rounded to x's dtype; weight/bias gradients are fp32 sums rounded to the parameters' dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol * w.abs().max().item())


def test_partial_sums_stay_bounded_when_programs_loop_over_row_blocks(monkeypatch):
    """With more row blocks than partial-sum columns, each backward program sums several blocks: the
    gradients still equal the reference."""
    monkeypatch.setattr(tqn, "_MAX_PARTIALS", 3)
    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn(300, 16, generator=gen).to(DEVICE), torch.randn(300, 16, generator=gen).to(DEVICE)
    weight, bias = torch.rand(16, generator=gen).to(DEVICE), torch.randn(16, generator=gen).to(DEVICE)
    fused = lambda *a: tqn.query_layer_norm(*a, kernel="triton")  # noqa: E731
    _, got = grads(fused, x, weight, bias, dy)
    _, want = grads(tqn.query_layer_norm_reference, x, weight, bias, dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


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


def test_gradients_only_where_needed_and_no_double_backward():
    """A bias needing a gradient with a frozen weight gets the reference's gradient (the weight none);
    a second backward through the kernels is refused rather than silently missing their terms."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.rand(16, generator=gen).to(DEVICE)  # frozen
    bias = torch.randn(16, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(5, 16, generator=gen).to(DEVICE)
    got = torch.autograd.grad(tqn.query_layer_norm(x, weight, bias, 1e-5, kernel="triton"), [x, bias], dy)
    want = torch.autograd.grad(tqn.query_layer_norm_reference(x, weight, bias, 1e-5), [x, bias], dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert weight.grad is None
    (dx,) = torch.autograd.grad(tqn.query_layer_norm(x, weight, bias, 1e-5, kernel="triton"), x, dy, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|differentiable"):
        dx.sum().backward()


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
