"""Kernel dispatch of the PEER expert computation (auto | triton | torch)."""

from __future__ import annotations

import logging

import pytest
import torch

import llm.ops.peer_experts as dispatch
from llm.ops.peer_reference import peer_experts_reference


def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen)
    idx = torch.randint(0, 9, (4, 2, 3), generator=gen)
    s = torch.rand(4, 2, 3, generator=gen)
    u, v = torch.randn(9, 1, 6, generator=gen), torch.randn(9, 1, 6, generator=gen)
    return x, idx, s, u, v


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_cpu_tensors_use_the_torch_reference(kernel, monkeypatch):
    def fail():
        raise AssertionError("CPU tensors must not reach the Triton loader under torch/auto")

    monkeypatch.setattr(dispatch, "_load_triton", fail)
    x, idx, s, u, v = inputs()
    out = dispatch.peer_experts(x, idx, s, u, v, "silu", kernel=kernel)
    torch.testing.assert_close(out, peer_experts_reference(x, idx, s, u, v, "silu"), rtol=0, atol=0)


def test_triton_kernel_is_called_with_the_contract(monkeypatch):
    calls = []

    def fake(x, indices, scores, u, v, activation, g=None, sparse_grad=False):
        calls.append((activation, g, sparse_grad))
        return torch.zeros_like(x)

    monkeypatch.setattr(dispatch, "_load_triton", lambda: (fake, ""))
    x, idx, s, u, v = inputs()
    out = dispatch.peer_experts(x, idx, s, u, v, "gelu", kernel="triton", sparse_grad=True)
    assert torch.equal(out, torch.zeros_like(x)) and calls == [("gelu", None, True)]


def test_triton_unavailable_raises_for_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "_load_triton", lambda: (None, "ImportError: no module named triton"))
    x, idx, s, u, v = inputs()
    with pytest.raises(ValueError, match="peer_config.kernel: 'triton' but .*no module named triton"):
        dispatch.peer_experts(x, idx, s, u, v, "gelu", kernel="triton")


def test_triton_on_cpu_without_the_interpreter_is_a_config_error(monkeypatch):
    """Triton kernels need a GPU (or TRITON_INTERPRET=1): one line naming the field, not a driver traceback."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, idx, s, u, v = inputs()
    with pytest.raises(ValueError, match="peer_config.kernel: 'triton' needs a CUDA device .*on cpu"):
        dispatch.peer_experts(x, idx, s, u, v, "gelu", kernel="triton")


def test_auto_fallback_logs_the_reason_once(monkeypatch, caplog):
    # The CUDA branch of 'auto' is exercised through a tensor that claims to be on CUDA.
    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(dispatch, "_load_triton", lambda: (None, "ImportError: fake reason 1234"))
    dispatch._warn_fallback.cache_clear()
    x, idx, s, u, v = inputs()
    with caplog.at_level(logging.WARNING, logger="llm.ops.peer_experts"):
        for _ in range(3):
            out = dispatch.peer_experts(x.as_subclass(FakeCuda), idx, s, u, v, "relu", kernel="auto")
    torch.testing.assert_close(out.as_subclass(torch.Tensor), peer_experts_reference(x, idx, s, u, v, "relu"))
    assert sum("fake reason 1234" in r.getMessage() for r in caplog.records) == 1


def test_unknown_kernel_raises():
    x, idx, s, u, v = inputs()
    with pytest.raises(ValueError, match="kernel: got 'cuda'"):
        dispatch.peer_experts(x, idx, s, u, v, "gelu", kernel="cuda")
