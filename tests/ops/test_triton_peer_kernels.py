"""llm/ops/triton_peer_kernels.py against the torch reference (Triton interpreter on CPU, or a GPU).

Every case compares the output and the gradients of x, scores, u, v (and g) with
``peer_experts_reference`` evaluated in fp32 on the same (rounded) inputs, by relative RMS error.
"""

import logging
import os

import pytest
import torch

from llm.ops import triton_peer_kernels as tpk
from llm.ops.peer_reference import peer_experts_reference
from llm.ops.triton_peer_kernels import peer_experts_triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
# Relative RMS error bounds per input dtype: fp32 is exact up to summation order; bf16/fp16 round the
# output and the table gradients once (8 and 11 mantissa bits).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def assert_close(name, got, ref, tol):
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = got - ref
    max_abs = err.abs().max().item() if err.numel() else 0.0
    rel_rms = (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item() if err.numel() else 0.0
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert rel_rms <= tol, f"{name}: max abs err {max_abs:.3e}, relative RMS err {rel_rms:.3e} > {tol:.1e}"


def make_indices(kind, T, H, K, N, gen):
    if kind == "repeats":  # few experts: many tokens share rows, rows repeat within a token
        return torch.randint(0, N, (T, H, K), generator=gen)
    if kind == "hot":  # one expert takes ~80% of the selections: one long backward segment
        idx = torch.randint(0, N, (T, H, K), generator=gen)
        return torch.where(torch.rand(T, H, K, generator=gen) < 0.8, torch.full_like(idx, 3), idx)
    if kind == "all_once":  # every expert exactly once: segments of length one
        assert N == T * H * K
        return torch.randperm(N, generator=gen).view(T, H, K)
    raise AssertionError(kind)


def make_inputs(T, H, K, N, M, D, glu, kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    scores = torch.softmax(torch.randn(T, H, K, generator=gen), dim=-1)
    tables = [torch.randn(N, M, D, generator=gen) / D**0.5 for _ in range(3 if glu else 2)]
    indices = make_indices(kind, T, H, K, N, gen)
    dout = torch.randn(T, D, generator=gen)
    cast = [t.to(dtype).to(DEVICE) for t in (x, scores, *tables, dout)]
    return cast[0], indices.to(DEVICE), cast[1], cast[2:-1], cast[-1]


def run(fn, x, indices, scores, tables, dout, activation, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (x, scores, *tables)]
    x_, s_, u_, v_ = leaves[:4]
    g_ = leaves[4] if len(leaves) == 5 else None
    out = fn(x_, indices, s_, u_, v_, activation, g=g_, **kw)
    out.backward(dout)
    grads = [t.grad.to_dense() if t.grad.is_sparse else t.grad for t in leaves]
    return out, grads


def check_against_reference(T, H, K, N, M, D, glu, kind, activation, dtype, **kw):
    x, indices, scores, tables, dout = make_inputs(T, H, K, N, M, D, glu, kind, dtype)
    out, grads = run(peer_experts_triton, x, indices, scores, tables, dout, activation, **kw)
    up = [t.float() for t in (x, scores, *tables)]
    ref_out, ref_grads = run(peer_experts_reference, up[0], indices, up[1], up[2:], dout.float(), activation)
    assert out.dtype == dtype
    for leaf, grad in zip((x, scores, *tables), grads, strict=True):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    tol = TOLERANCE[dtype]
    assert_close("out", out, ref_out, tol)
    for name, got, ref in zip(["dx", "dscores", "du", "dv", "dg"], grads, ref_grads, strict=False):
        assert_close(name, got, ref, tol)


# (T, H, K, N, M, D, glu, indices kind, activation): D never a power of two, N tiny for repeats.
CASES = {
    "repeats-gelu": (6, 2, 3, 5, 1, 40, False, "repeats", "gelu"),
    "hot-silu": (9, 2, 2, 16, 1, 24, False, "hot", "silu"),
    "all_once-relu": (4, 2, 3, 24, 1, 33, False, "all_once", "relu"),
    "T1-gelu": (1, 3, 2, 7, 1, 20, False, "repeats", "gelu"),
    "M3-glu-gelu": (5, 2, 2, 6, 3, 28, True, "repeats", "gelu"),
    "M2-silu": (4, 1, 4, 9, 2, 48, False, "repeats", "silu"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference_fp32(case):
    check_against_reference(*CASES[case], torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["repeats-gelu", "M3-glu-gelu"])
def test_matches_reference_low_precision(case, dtype):
    check_against_reference(*CASES[case], dtype)


def test_sparse_grads_equal_dense_grads_and_hold_only_touched_experts():
    T, H, K, N, M, D = 5, 2, 2, 30, 2, 20
    x, indices, scores, tables, dout = make_inputs(T, H, K, N, M, D, True, "repeats", torch.float32)
    _, dense = run(peer_experts_triton, x, indices, scores, tables, dout, "gelu")
    leaves = [t.detach().clone().requires_grad_() for t in (x, scores, *tables)]
    peer_experts_triton(leaves[0], indices, leaves[1], *leaves[2:4], "gelu", g=leaves[4], sparse_grad=True).backward(
        dout
    )
    touched = torch.unique(indices)
    for leaf, want in zip(leaves[2:], dense[2:], strict=True):
        # autograd's accumulation drops the coalesced flag; the rows are still sorted and distinct
        assert leaf.grad.is_sparse and torch.equal(leaf.grad._indices()[0], touched)
        assert torch.equal(leaf.grad.to_dense(), want)


@pytest.mark.parametrize("M", [1, 3])
def test_forward_row_count_equals_the_sorts_count(M):
    """Sparse gradients are sized by the forward's bitmap count of touched rows: it must equal the
    number of segments the backward's sort finds, for a few shared rows and for all-distinct rows."""
    gen = torch.Generator().manual_seed(0)
    N = 40
    few = torch.randint(0, 3, (6, 2, 2), generator=gen)
    distinct = torch.randperm(N, generator=gen)[:24].view(6, 2, 2)
    for indices in (few, distinct):
        indices = indices.to(DEVICE)
        counted = tpk.touched_row_count(indices, N, M)
        _, _, seg_start = tpk.sort_rows(indices, M, N, deterministic=True)
        segments = int((seg_start < indices.numel() * M).sum())
        assert counted.tolist() == [segments] == [torch.unique(indices).numel() * M]


@pytest.mark.parametrize(
    "T,which,deterministic",
    [(5, (0, 1, 2), True), (5, (1,), False), (5, (2,), False), (5, (0, 2), False), (0, (0, 1, 2), False)],
    ids=["deterministic", "only-v-needs-grad", "only-g-needs-grad", "u-and-g", "no-tokens"],
)
def test_sparse_grads_edge_cases_equal_dense_grads(T, which, deterministic):
    """Sparse table gradients equal the dense ones with a stable sort, when only some tables need a
    gradient (the others get none: pass B skips their launch, and the expert ids come from whichever
    launch runs first), and with no tokens at all (empty gradients of the right shape)."""
    H, K, N, M, D = 2, 2, 9, 2, 20
    x, indices, scores, tables, dout = make_inputs(max(T, 1), H, K, N, M, D, True, "repeats", torch.float32)
    x, indices, scores, dout = x[:T], indices[:T], scores[:T], dout[:T]
    grads = {}
    for sparse in (False, True):
        leaves = [t.detach().clone().requires_grad_(i in which) for i, t in enumerate(tables)]
        out = peer_experts_triton(
            x, indices, scores, leaves[0], leaves[1], "gelu", g=leaves[2], deterministic=deterministic,
            sparse_grad=sparse,
        )  # fmt: skip
        out.backward(dout)
        grads[sparse] = [t.grad for t in leaves]
    for i, (dense, sparse) in enumerate(zip(grads[False], grads[True], strict=True)):
        assert (dense is None) == (sparse is None) == (i not in which)
        if dense is not None:
            assert sparse.is_sparse and sparse.shape == dense.shape
            assert torch.equal(sparse.to_dense(), dense)
    refs = [t.detach().clone().requires_grad_(i in which) for i, t in enumerate(tables)]
    peer_experts_reference(x, indices, scores, refs[0], refs[1], "gelu", g=refs[2]).backward(dout)
    for got, ref in zip(grads[False], refs, strict=True):
        if got is not None:
            assert_close("table grad", got, ref.grad, TOLERANCE[torch.float32])


def test_row_count_is_taken_only_when_a_backward_will_need_it(monkeypatch):
    """The forward counts touched rows (for sparse gradients) only with grad mode on and a table that
    needs a gradient; the backward then reuses that count."""
    calls = []
    real = tpk.touched_row_count
    monkeypatch.setattr(tpk, "touched_row_count", lambda *a: calls.append(1) or real(*a))
    x, indices, scores, tables, dout = make_inputs(4, 2, 2, 7, 1, 16, False, "repeats", torch.float32)
    params = [t.clone().requires_grad_() for t in tables]
    with torch.no_grad():
        peer_experts_triton(x, indices, scores, *params, "gelu", sparse_grad=True)
    peer_experts_triton(x, indices, scores, *tables, "gelu", sparse_grad=True)  # tables need no grad
    assert calls == []
    peer_experts_triton(x, indices, scores, *params, "gelu", sparse_grad=True).backward(dout)
    assert calls == [1] and params[0].grad.is_sparse


def test_sparse_pass_b_refuses_segments_that_do_not_match_the_row_count():
    x, indices, scores, tables, dout = make_inputs(3, 2, 2, 6, 1, 16, False, "repeats", torch.float32)
    _, pre, _ = tpk.peer_forward(x, indices, scores, *tables, None, "gelu")
    _, _, cu, cv, _ = tpk.peer_backward_tokens(dout, x, indices, scores, *tables, None, pre, None, "gelu")
    perm, sorted_rows, seg_start = tpk.sort_rows(indices, 1, 6, deterministic=True)  # upper-bound segments
    R = torch.unique(indices).numel()
    with pytest.raises(ValueError, match=f"R={R}"):
        tpk.peer_backward_rows(dout, x, cu, cv, None, perm, sorted_rows, seg_start, (*tables, None), R)


def test_backward_is_bitwise_reproducible_with_a_hot_expert():
    x, indices, scores, tables, dout = make_inputs(12, 2, 4, 8, 1, 36, False, "hot", torch.float32)
    _, first = run(peer_experts_triton, x, indices, scores, tables, dout, "gelu", deterministic=True)
    _, second = run(peer_experts_triton, x, indices, scores, tables, dout, "gelu", deterministic=True)
    _, default = run(peer_experts_triton, x, indices, scores, tables, dout, "gelu")
    for a, b, c in zip(first, second, default, strict=True):
        assert torch.equal(a, b)
        # without deterministic the sort may be unstable: same sums, rows possibly summed in another order
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


def test_saves_only_indices_scores_and_preactivations():
    T, H, K, N, M, D = 4, 2, 3, 10, 1, 24
    x, indices, scores, tables, _ = make_inputs(T, H, K, N, M, D, False, "repeats", torch.float32)
    params = [t.requires_grad_() for t in tables]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        peer_experts_triton(x.requires_grad_(), indices, scores.requires_grad_(), *params, "gelu")
    activations = [t for t in saved if not any(t.data_ptr() == p.data_ptr() for p in params + [x])]
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == sorted([(T, H, K), (T, H, K), (T, H * K * M)]), shapes
    per_token = sum(t.numel() * t.element_size() for t in activations) / T
    assert per_token == H * K * (8 + 4 + 4)  # int64 index, fp32 score, fp32 pre-activation


def test_wide_inputs_fall_back_to_the_reference_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setattr(tpk, "MAX_FUSED_DIM", 16)
    tpk._warn_fallback.cache_clear()  # an earlier test may have logged this reason already
    x, indices, scores, tables, _ = make_inputs(3, 2, 2, 5, 1, 20, False, "repeats", torch.float32)
    with caplog.at_level(logging.WARNING, logger=tpk.__name__):
        out = peer_experts_triton(x, indices, scores, *tables, "relu")
    assert "MAX_FUSED_DIM" in caplog.text
    assert torch.equal(out, peer_experts_reference(x, indices, scores, *tables, "relu"))


def test_rejects_unknown_activation_and_non_int64_indices():
    x, indices, scores, tables, _ = make_inputs(2, 1, 2, 4, 1, 8, False, "repeats", torch.float32)
    with pytest.raises(ValueError, match="activation"):
        peer_experts_triton(x, indices, scores, *tables, "tanh")
    with pytest.raises(ValueError, match="int64"):
        peer_experts_triton(x, indices.int(), scores, *tables, "gelu")


@pytest.mark.parametrize("num_rows", [None, 8], ids=["upper-bound", "exact"])
def test_sort_rows_segments_on_device_without_reading_the_count(num_rows):
    idx = torch.tensor([[[4, 1], [4, 4]], [[0, 1], [7, 4]]])  # (T=2, H=2, K=2), M=2 -> rows 2*e, 2*e+1
    perm, sorted_rows, seg_start = tpk.sort_rows(idx.to(DEVICE), 2, 8, deterministic=True, num_rows=num_rows)
    n = idx.numel() * 2
    starts = [0, 1, 2, 4, 6, 10, 14, 15]  # rows 0, 1, 2, 3, 8, 9, 14, 15: experts 0, 1, 4, 7, two units each
    assert seg_start.tolist() == starts + [n] * (len(seg_start) - 8)
    assert len(seg_start) == (n if num_rows is None else num_rows) + 1
    assert sorted_rows[starts].tolist() == [0, 1, 2, 3, 8, 9, 14, 15]
    assert perm[seg_start[4] : seg_start[5]].tolist() == [0, 4, 6, 14]  # row 8: expert 4, unit 0


@pytest.mark.skipif(DEVICE != "cuda", reason="host-sync detection needs a CUDA device")
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse"])
def test_forward_backward_has_no_host_sync(sparse_grad):
    x, indices, scores, tables, dout = make_inputs(64, 4, 8, 512, 1, 256, False, "repeats", torch.bfloat16)
    run(peer_experts_triton, x, indices, scores, tables, dout, "gelu", sparse_grad=sparse_grad)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, grads = run(peer_experts_triton, x, indices, scores, tables, dout, "gelu", sparse_grad=sparse_grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)
