"""llm/ops/triton_peer_routing.py: the merge kernel equals the torch reference (TRITON_INTERPRET=1 on CPU),
and product-key retrieval through the kernels equals brute force with the reference's gradients."""

from __future__ import annotations

import os

import pytest
import torch

from llm.models import product_keys
from llm.models.product_keys import brute_force_topk, product_topk, retrieve_topk, subkey_scores_from_queries
from llm.ops import triton_peer_routing, triton_topk
from llm.ops.triton_peer_routing import merge_topk_reference, merge_topk_triton

pytestmark = pytest.mark.skipif(triton_peer_routing.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _lists(R, KA, KB, n_a, n_b, ties, seed):
    """Two candidate lists: values (R, KA) / (R, KB), unique ids < n_a per row, unique positions < n_b."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        a, b = (torch.randint(-2, 3, (R, n), generator=gen).float() for n in (KA, KB))
    else:
        a, b = torch.randn(R, KA, generator=gen), torch.randn(R, KB, generator=gen)
    a_ids = torch.stack([torch.randperm(n_a, generator=gen)[:KA] for _ in range(R)])
    b_pos = torch.stack([torch.randperm(n_b, generator=gen)[:KB] for _ in range(R)])
    return a, a_ids, b, b_pos


@pytest.mark.parametrize("R,KA,KB,k", [(1, 1, 1, 1), (7, 5, 3, 15), (9, 16, 16, 16), (33, 4, 16, 7)], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_merge_kernel_matches_reference(R, KA, KB, k, ties):
    n_b = 20
    a, a_ids, b, b_pos = _lists(R, KA, KB, 50, n_b, ties, seed=R + KA + KB + k)
    got = merge_topk_triton(*(t.to(DEVICE) for t in (a, a_ids, b, b_pos)), n_b, k)
    want = merge_topk_reference(a, a_ids, b, b_pos, n_b, k)
    assert torch.equal(got[1].cpu(), want[1]), (got[1], want[1])
    assert torch.equal(got[0].cpu(), want[0])


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Route product_topk through the kernels (interpreted on CPU) as it does for CUDA tensors."""
    if DEVICE == "cpu":

        def applies(*tensors, **_):
            return all(t.dtype == torch.float32 for t in tensors if isinstance(t, torch.Tensor))

        monkeypatch.setattr(triton_topk, "kernel_applies", applies)
        monkeypatch.setattr(product_keys, "kernel_applies", applies)
        monkeypatch.setattr(triton_peer_routing, "merge_kernel_applies", applies)


@pytest.mark.parametrize("sizes,k", [([8, 8], 5), ([6, 5, 4], 10), ([16, 16], 16)], ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_product_topk_through_kernels_equals_brute_force(kernels_on_cpu, sizes, k, ties):
    gen = torch.Generator().manual_seed(len(sizes) * 10 + k)
    make = (
        (lambda n: torch.randint(-3, 4, (4, 3, n), generator=gen).float())
        if ties
        else (lambda n: torch.randn(4, 3, n, generator=gen))
    )
    parts = [make(n).to(DEVICE).requires_grad_() for n in sizes]
    scores, ids = product_topk(parts, k)
    with torch.no_grad():
        want_scores, want_ids = brute_force_topk([p.detach().cpu() for p in parts], k)
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.equal(scores.detach().cpu(), want_scores)
    scores.sum().backward()  # gathered scores carry the gradient: each part gets k ones per row
    for part in parts:
        assert torch.equal(part.grad.sum(-1).cpu(), torch.full((4, 3), float(k)))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-head"])
@pytest.mark.parametrize("sizes", [[8, 8], [3, 4, 2]], ids=str)
def test_retrieve_topk_kernels_forward_and_gradients_equal_dense_reference(kernels_on_cpu, shared, sizes):
    gen = torch.Generator().manual_seed(len(sizes) + shared)
    T, H, q, k = 6, 2, 3, 5
    q_THQ = torch.randn(T, H, q * len(sizes), generator=gen).to(DEVICE).requires_grad_()
    keys = [torch.randn(*(() if shared else (H,)), n, q, generator=gen).to(DEVICE).requires_grad_() for n in sizes]
    weight = torch.randn(T, H, k, generator=gen).to(DEVICE)
    scores, ids = retrieve_topk(q_THQ, keys, k)
    (scores * weight).sum().backward()
    got = [q_THQ.grad] + [key.grad for key in keys]

    ref_inputs = [t.detach().cpu().requires_grad_() for t in [q_THQ, *keys]]
    with torch.no_grad():  # the reference path (dense autograd) on CPU, without the kernels
        want_scores, want_ids = brute_force_topk(subkey_scores_from_queries(ref_inputs[0], ref_inputs[1:]), k)
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(scores.detach().cpu(), want_scores, rtol=1e-6, atol=1e-6)
    parts = subkey_scores_from_queries(ref_inputs[0], ref_inputs[1:])
    ref_scores = product_keys.gather_scores(parts, product_keys.unravel_ids(want_ids, sizes))
    (ref_scores * weight.cpu()).sum().backward()
    for g, ref in zip(got, ref_inputs, strict=True):
        torch.testing.assert_close(g.cpu(), ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("R,K,n,Q", [(1, 1, 1, 1), (13, 4, 7, 5), (40, 16, 9, 32)], ids=str)
@pytest.mark.parametrize("hot", [False, True], ids=["uniform", "hot-row"])
@pytest.mark.parametrize("P", [1, 3], ids=["1part", "3parts"])
def test_routing_backward_kernels_equal_references(R, K, n, Q, hot, P):
    """dq (weighted gather) and d sub-keys (sorted segments) equal gather/index_add, on column slices;
    P parts share one stacked table and write their own column blocks."""
    gen = torch.Generator().manual_seed(R + K + n + Q + hot + P)
    idx = torch.randint(0, n, (P, R, K), generator=gen)
    if hot:  # one row takes ~80% of the entries: one long segment; others may stay empty
        idx = torch.where(torch.rand(P, R, K, generator=gen) < 0.8, torch.zeros_like(idx), idx)
    w = torch.randn(R, K, generator=gen)
    table = torch.randn(n, Q, generator=gen)
    wide = torch.randn(R, (P + 2) * Q, generator=gen)  # src is the middle columns, as for parts 1..P of P+2
    src = wide[:, Q : (P + 1) * Q]
    d = lambda t: t.to(DEVICE)  # noqa: E731
    out = torch.full((R, (P + 2) * Q), float("nan"), device=DEVICE)  # poisoned: only the slice is written
    triton_peer_routing.weighted_gather_triton(d(idx), d(w), d(table), out[:, Q : (P + 1) * Q])
    torch.testing.assert_close(
        out[:, Q : (P + 1) * Q].cpu(),
        triton_peer_routing.weighted_gather_reference(idx, w, table),
        rtol=1e-5,
        atol=1e-5,
    )
    assert out[:, :Q].isnan().all() and out[:, (P + 1) * Q :].isnan().all()
    got = triton_peer_routing.segment_rows_triton(d(idx), d(w), d(wide)[:, Q : (P + 1) * Q], n)
    want = triton_peer_routing.segment_rows_reference(idx, w, src, n)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    again = triton_peer_routing.segment_rows_triton(d(idx), d(w), d(wide)[:, Q : (P + 1) * Q], n)
    assert torch.equal(got, again)  # fixed summation order: same bits every run


def test_sort_segments_bounds_every_row_including_empty_ones():
    idx = torch.tensor([[3, 0], [3, 5], [0, 3]])
    perm, seg = triton_peer_routing.sort_segments(idx.to(DEVICE), 7)
    assert seg.tolist() == [0, 2, 2, 2, 5, 5, 6, 6]  # rows 0: 2 entries, 3: 3, 5: 1; others empty
    assert perm.tolist() == [1, 4, 0, 2, 5, 3]  # stable: ascending entry id within a row


@pytest.mark.skipif(DEVICE != "cuda", reason="host-sync detection needs a CUDA device")
def test_retrieve_topk_forward_backward_has_no_host_sync():
    T, H, q, n, k = 64, 4, 16, 64, 8
    q_THQ = torch.randn(T, H, 2 * q, device="cuda", requires_grad=True)
    keys = [torch.randn(n, q, device="cuda", requires_grad=True) for _ in range(2)]
    retrieve_topk(q_THQ, keys, k)  # warm-up: compiles the kernels (compilation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores, _ = retrieve_topk(q_THQ, keys, k)
        grads = torch.autograd.grad(scores.sum(), [q_THQ, *keys])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)
