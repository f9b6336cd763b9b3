"""Exact product-key top-k: pairwise merge-and-prune equals brute force, ties to the lower flat id."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.models import product_keys
from llm.models.product_keys import brute_force_topk, product_topk, retrieve_topk, subkey_scores_from_queries
from llm.ops import triton_retrieval

# Tests that force the Triton kernels run them on the interpreter's CPU tensors, or on the GPU where the
# interpreter is off (a compiled kernel cannot read CPU tensors).
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def python_brute_force(parts, k):
    """Independent oracle: every coordinate tuple, summed left to right, sorted by (-score, flat id)."""
    sizes = [p.shape[-1] for p in parts]
    rows = parts[0].reshape(-1, sizes[0]).shape[0]
    flat = [p.reshape(rows, -1).tolist() for p in parts]
    best_scores, best_ids = [], []
    for r in range(rows):
        cands = []
        for coords in itertools.product(*(range(n) for n in sizes)):
            score, flat_id = flat[0][r][coords[0]], coords[0]
            for p in range(1, len(sizes)):
                score = score + flat[p][r][coords[p]]
                flat_id = flat_id * sizes[p] + coords[p]
            cands.append((-score, flat_id))
        cands.sort()
        best_scores.append([-s for s, _ in cands[:k]])
        best_ids.append([i for _, i in cands[:k]])
    return best_scores, best_ids


def make_parts(sizes, lead, values, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    if values == "ties":  # small integers: many exact ties, sums exact in floating point
        return [torch.randint(-2, 3, (*lead, n), generator=gen).to(dtype) for n in sizes]
    return [torch.randn(*lead, n, generator=gen, dtype=dtype) for n in sizes]


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    k_frac=st.floats(0.0, 1.0),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    values=st.sampled_from(["normal", "ties"]),
    seed=st.integers(0, 2**16),
)
def test_product_topk_equals_python_brute_force(sizes, k_frac, lead, values, seed):
    total = 1
    for n in sizes:
        total *= n
    k = 1 + round(k_frac * (min(total, 12) - 1))  # k in [1, min(N, 12)]: often larger than a part's size
    parts = make_parts(sizes, lead, values, seed)
    scores, ids = product_topk(parts, k)
    assert scores.shape == ids.shape == (*lead, k) and ids.dtype == torch.int64
    want_scores, want_ids = python_brute_force(parts, k)
    assert ids.reshape(-1, k).tolist() == want_ids
    assert scores.reshape(-1, k).tolist() == want_scores  # bit-exact: same summation order
    lib_scores, lib_ids = brute_force_topk(parts, k)
    assert torch.equal(lib_ids, ids) and torch.equal(lib_scores, scores)


@pytest.mark.parametrize("sizes", [[1024, 1024], [16, 8, 2], [8, 8, 8, 8]], ids=["2d-1M", "uneven", "4d"])
def test_product_topk_float32_large(sizes):
    parts = make_parts(sizes, (1,), "normal", seed=3, dtype=torch.float32)
    scores, ids = product_topk(parts, 16)
    want_scores, want_ids = brute_force_topk(parts, 16)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)


def test_ties_go_to_lower_flat_id():
    # All experts score 0: the top-k are the k lowest ids, in order.
    parts = [torch.zeros(2, n) for n in (3, 4, 2)]
    _, ids = product_topk(parts, 5)
    assert ids.tolist() == [[0, 1, 2, 3, 4]] * 2
    # Experts (0, 3) = id 3 and (1, 0) = id 4 tie behind (1, 3) = id 7; the lower id comes first.
    a = torch.tensor([[0.0, 1.0]])
    b = torch.tensor([[0.0, -5.0, -5.0, 1.0]])
    scores, ids = product_topk([a, b], 3)
    assert ids.tolist() == [[7, 3, 4]] and scores.tolist() == [[2.0, 1.0, 1.0]]
    # Pruning must keep the tie order: with k=2 only id 3 of the tied pair survives.
    _, ids = product_topk([a, b], 2)
    assert ids.tolist() == [[7, 3]]


def test_scores_are_differentiable_sums_of_subkey_scores():
    parts = [t.requires_grad_(True) for t in make_parts([5, 4, 3], (2,), "normal", seed=7)]
    scores, ids = product_topk(parts, 6)
    scores.sum().backward()
    # d(sum of chosen scores)/d s_p[c] = how many chosen experts have coordinate c in part p.
    coords = [ids // 12, (ids // 3) % 4, ids % 3]
    for part, coord, n in zip(parts, coords, (5, 4, 3), strict=True):
        counts = torch.stack([torch.bincount(row, minlength=n) for row in coord]).to(part.dtype)
        assert torch.equal(part.grad, counts)


def test_bad_k_raises():
    parts = [torch.zeros(2, 3), torch.zeros(2, 2)]
    with pytest.raises(ValueError, match="k=7"):
        product_topk(parts, 7)
    with pytest.raises(ValueError, match="k=0"):
        product_topk(parts, 0)
    with pytest.raises(ValueError, match="empty"):
        product_topk([], 1)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-head"])
def test_retrieve_topk_equals_product_topk_with_same_gradients(shared):
    """The row-sparse backward (embedding_bag) equals autograd through the dense sub-key scores (float64)."""
    gen = torch.Generator().manual_seed(3)
    sizes, T, H, q, k = [4, 3, 5], 5, 2, 2, 7
    q_THQ = torch.randn(T, H, q * len(sizes), generator=gen, dtype=torch.float64, requires_grad=True)
    keys = [
        torch.randn(*(() if shared else (H,)), n, q, generator=gen, dtype=torch.float64, requires_grad=True)
        for n in sizes
    ]
    scores, ids = retrieve_topk(q_THQ, keys, k)
    want_scores, want_ids = product_topk(subkey_scores_from_queries(q_THQ, keys), k)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    weight = torch.randn(T, H, k, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((scores * weight).sum(), [q_THQ, *keys])
    want = torch.autograd.grad((want_scores * weight).sum(), [q_THQ, *keys])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(triton_retrieval.triton is None, reason="triton is not installed")
def test_retrieve_topk_through_the_fused_kernel(monkeypatch):
    """Two fp32 parts take the fused kernel where it applies (CUDA; forced here on the interpreter's CPU
    tensors): same experts and scores as the unfused path on exact integer scores, same gradients."""
    calls = []

    def applies_and_count(*args):
        calls.append(1)
        return True

    monkeypatch.setattr(product_keys, "fused_retrieval_applies", applies_and_count)
    gen = torch.Generator().manual_seed(5)
    T, H, q, n, k = 9, 2, 16, 40, 6
    q_THQ = torch.randint(-2, 3, (T, H, 2 * q), generator=gen).float().to(KERNEL_DEVICE).requires_grad_()
    keys = [
        torch.randint(-2, 3, (H, n, q), generator=gen).float().to(KERNEL_DEVICE).requires_grad_() for _ in range(2)
    ]
    scores, ids = retrieve_topk(q_THQ, keys, k)
    assert calls
    want_scores, want_ids = product_topk(subkey_scores_from_queries(q_THQ, keys), k)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    weight = torch.randn(T, H, k, generator=gen).to(KERNEL_DEVICE)
    got = torch.autograd.grad((scores * weight).sum(), [q_THQ, *keys])
    want = torch.autograd.grad((want_scores * weight).sum(), [q_THQ, *keys])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(triton_retrieval.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("layout", ["shared", "per-head", "mixed"])
@pytest.mark.parametrize("sizes", [[6, 4, 5], [6, 5]], ids=["3parts", "2parts"])
def test_routing_backward_kernels_equal_the_torch_backward(monkeypatch, layout, sizes):
    """The Triton routing backward (all parts stacked into one table: one gather, one sort, one segment
    reduction; forced here on the interpreter's CPU tensors) gives the torch backward's gradients, for
    parts of different sizes (shared, per-head, or mixed sub-key sets; two parts get their stacked rows
    from their own kernel), with and without a gradient for the queries, and with a gradient for one part
    only."""
    gen = torch.Generator().manual_seed(11)
    T, H, q, k = 7, 2, 4, 5
    q_THQ = torch.randn(T, H, q * len(sizes), generator=gen).to(KERNEL_DEVICE).requires_grad_()
    per_head = {"shared": [False] * 3, "per-head": [True] * 3, "mixed": [False, True, False]}[layout][: len(sizes)]
    keys = [
        torch.randn(*((H,) if ph else ()), n, q, generator=gen).to(KERNEL_DEVICE).requires_grad_()
        for n, ph in zip(sizes, per_head, strict=True)
    ]
    weight = torch.randn(T, H, k, generator=gen).to(KERNEL_DEVICE)
    grads = {}
    for use_kernels in (False, True):
        monkeypatch.setattr(product_keys, "kernel_applies", lambda t, on=use_kernels: on)
        scores, _ = retrieve_topk(q_THQ, keys, k)
        grads[use_kernels] = torch.autograd.grad((scores * weight).sum(), [q_THQ, *keys])
        keys_only = torch.autograd.grad((retrieve_topk(q_THQ.detach(), keys, k)[0] * weight).sum(), keys)
        only_1 = [keys[0].detach(), keys[1], *(t.detach() for t in keys[2:])]  # only part 1 needs a gradient
        one_part = torch.autograd.grad((retrieve_topk(q_THQ.detach(), only_1, k)[0] * weight).sum(), keys[1])
        for g, w in zip([*keys_only, *one_part], [*grads[use_kernels][1:], grads[use_kernels][2]], strict=True):
            torch.testing.assert_close(g, w)
    for g, w in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_use_kernels_false_never_dispatches_to_triton(monkeypatch):
    """``use_kernels=False`` (PEERConfig.kernel: torch) keeps retrieval in PyTorch even where the fused
    kernel would apply (forced here) or the top-k kernels would (CUDA)."""
    monkeypatch.setattr(product_keys, "fused_retrieval_applies", lambda *a: pytest.fail("fused kernel consulted"))
    monkeypatch.setattr(product_keys, "kernel_applies", lambda *a: pytest.fail("top-k kernels consulted"))
    gen = torch.Generator().manual_seed(6)
    q_THQ = torch.randn(4, 2, 8, generator=gen, requires_grad=True)
    keys = [torch.randn(2, 6, 4, generator=gen, requires_grad=True) for _ in range(2)]
    scores, ids = retrieve_topk(q_THQ, keys, 5, use_kernels=False)
    scores.sum().backward()
    want_scores, want_ids = brute_force_topk(subkey_scores_from_queries(q_THQ.detach(), [t.detach() for t in keys]), 5)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores.detach(), want_scores)
