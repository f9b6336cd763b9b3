"""The torch reference of the PEER expert computation: maths, gradients, chunking and its memory bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llm.ops.peer_reference import peer_experts_reference

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def make_inputs(T, D, H, K, N, M, glu, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, dtype=dtype)
    indices = torch.randint(0, N, (T, H, K), generator=gen)
    scores = torch.rand(T, H, K, generator=gen, dtype=dtype)
    u, v = (torch.randn(N, M, D, generator=gen, dtype=dtype) * D**-0.5 for _ in range(2))
    g = torch.randn(N, M, D, generator=gen, dtype=dtype) * D**-0.5 if glu else None
    return x, indices, scores, u, v, g


def naive_experts(x, indices, scores, u, v, activation, g=None):
    """Unchunked plain-autograd version: gathers every (T, H, K, M, D) row at once."""
    pre = torch.einsum("thkmd,td->thkm", u[indices], x)
    hid = ACT[activation](pre)
    if g is not None:
        hid = hid * torch.einsum("thkmd,td->thkm", g[indices], x)
    return torch.einsum("thk,thkm,thkmd->td", scores, hid, v[indices])


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize(
    "activation,glu,M,max_gather_bytes",
    [
        ("gelu", False, 1, 256 * 2**20),
        ("relu", False, 3, 1),  # one token per chunk
        ("silu", True, 2, 3 * 2 * 2 * 2 * 5 * 8),  # 3 tokens per chunk, 7 tokens: a ragged last chunk
        ("gelu", True, 1, 1000),
    ],
    ids=["gelu-m1-one_chunk", "relu-m3-chunk1", "silu-glu-m2-chunk3", "gelu-glu-m1-chunk_odd"],
)
def test_forward_and_grads_match_unchunked_autograd(activation, glu, M, max_gather_bytes):
    inputs = make_inputs(T=7, D=5, H=2, K=2, N=11, M=M, glu=glu)
    x, idx, s, u, v, g = (leaf(t) if t is not None and t.is_floating_point() else t for t in inputs)
    out = peer_experts_reference(x, idx, s, u, v, activation, g=g, max_gather_bytes=max_gather_bytes)
    x2, s2, u2, v2, g2 = (leaf(t) for t in (x, s, u, v, g))
    ref = naive_experts(x2, idx, s2, u2, v2, activation, g=g2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b, name in ((x, x2, "x"), (s, s2, "scores"), (u, u2, "u"), (v, v2, "v"), (g, g2, "g")):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
def test_gradcheck_float64(activation, glu):
    x, idx, s, u, v, g = make_inputs(T=3, D=4, H=2, K=2, N=5, M=2, glu=glu, seed=1)
    tensors = [t.requires_grad_(True) for t in (x, s, u, v) + ((g,) if glu else ())]

    def fn(x, s, u, v, *g):
        return peer_experts_reference(x, idx, s, u, v, activation, g=g[0] if g else None, max_gather_bytes=70)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7)


def test_bf16_inputs_accumulate_in_fp32():
    x, idx, s, u, v, _ = make_inputs(T=9, D=16, H=2, K=4, N=13, M=2, glu=False, dtype=torch.float32)
    out = peer_experts_reference(x.bfloat16(), idx, s, u.bfloat16(), v.bfloat16(), "gelu")
    assert out.dtype == torch.bfloat16
    ref = naive_experts(x.bfloat16().float(), idx, s, u.bfloat16().float(), v.bfloat16().float(), "gelu")
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    xb, ub = x.bfloat16().requires_grad_(), u.bfloat16().requires_grad_()
    peer_experts_reference(xb, idx, s, ub, v.bfloat16(), "gelu").float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and ub.grad.dtype == torch.bfloat16
    assert torch.isfinite(xb.grad.float()).all()


def test_zero_tokens():
    x, idx, s, u, v, _ = make_inputs(T=0, D=4, H=2, K=2, N=5, M=1, glu=False)
    x.requires_grad_(True)
    out = peer_experts_reference(x, idx, s, u, v, "relu")
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 4)


def test_bad_arguments_raise():
    x, idx, s, u, v, _ = make_inputs(T=2, D=4, H=1, K=2, N=5, M=1, glu=False)
    with pytest.raises(ValueError, match="activation"):
        peer_experts_reference(x, idx, s, u, v, "tanh")
    with pytest.raises(ValueError, match="int64"):
        peer_experts_reference(x, idx.int(), s, u, v, "gelu")
    with pytest.raises(ValueError, match="scores"):
        peer_experts_reference(x, idx, s[:, :, :1], u, v, "gelu")
    with pytest.raises(ValueError, match="table v"):
        peer_experts_reference(x, idx, s, u, v[:, :, :3], "gelu")


class LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of storages created under the mode that are still alive, and their peak.

    Liveness is checked at every aten op through storage weak references, so the peak is exact at op
    granularity (scratch memory inside a single op is not seen). Storages that existed before (inputs,
    parameters) are ignored even when an op returns a view of them.
    """

    def __init__(self, preexisting):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in preexisting if t is not None}
        self.live = {}  # data_ptr -> (StorageWeakRef, nbytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.skip and (ptr not in self.live or self.live[ptr][0].expired()):
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[ptr]
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def measure_peak_extra(T, D, H, K, N, M, glu, max_gather_bytes):
    x, idx, s, u, v, g = make_inputs(T, D, H, K, N, M, glu, dtype=torch.float32)
    tensors = [t.requires_grad_(True) for t in (x, s, u, v, g) if t is not None]
    grad_out = torch.randn(T, D)
    with LiveTensorBytes(tensors + [idx, grad_out]) as tracker:
        out = peer_experts_reference(x, idx, s, u, v, "gelu", g=g, max_gather_bytes=max_gather_bytes)
        out.backward(grad_out)
    return tracker.peak


def test_peak_memory_of_forward_backward_is_bounded_by_chunk_size():
    """Bound (fp32): peak extra <= table grads + 4*T*D*4 (out, grad_x and their temporaries)
    + 5 * max_gather_bytes + 64 * T*H*K*M bytes. Without chunking the same case needs far more."""
    T, D, H, K, N, M = 1024, 64, 4, 8, 512, 2
    gathered = T * H * K * M * D * 4  # 16 MiB: one unchunked (T, H, K, M, D) fp32 tensor
    budget = 2**20
    for glu in (False, True):
        tables = (3 if glu else 2) * N * M * D * 4
        bound = tables + 4 * T * D * 4 + 5 * budget + 64 * T * H * K * M
        peak = measure_peak_extra(T, D, H, K, N, M, glu, budget)
        assert tables < peak <= bound, f"glu={glu}: peak {peak / 2**20:.2f} MiB > bound {bound / 2**20:.2f} MiB"
        unchunked = measure_peak_extra(T, D, H, K, N, M, glu, 2 * gathered)
        assert unchunked > bound + gathered // 2, f"unchunked {unchunked / 2**20:.2f} MiB: the tracker misses rows"
