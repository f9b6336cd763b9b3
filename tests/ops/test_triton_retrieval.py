"""llm/ops/triton_retrieval.py: the fused two-part retrieval kernels equal the unfused reference.

CI runs the kernel through the Triton interpreter on CPU tensors; on a GPU (TRITON_INTERPRET=0) compiled.
Small-integer queries and sub-keys make every score exact in any precision, so ids must match bit for bit
(and the many ties check the lower-id rule); Gaussian data checks values to rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

from llm.ops import triton_retrieval
from llm.ops.triton_retrieval import fused_retrieval, fused_retrieval_applies, fused_retrieval_reference

pytestmark = pytest.mark.skipif(triton_retrieval.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _inputs(T, H, q, n0, n1, per_head, integer, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = (H,) if per_head else ()

    def draw(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=gen).float()
        return torch.randn(shape, generator=gen)

    return draw(T, H, 2 * q), [draw(*lead, n0, q), draw(*lead, n1, q)]


# (T, H, q, n0, n1, k, per_head, block_n): several chunks per part (n > block_n), sizes that are not
# powers of two, parts smaller than k (4 x 4 experts, k = 16: every expert), k = 1 and k = 5, T not a
# multiple of the token block.
CASES = [
    (21, 1, 16, 70, 40, 16, True, 32),
    (5, 1, 16, 4, 4, 16, False, 16),
    (9, 2, 16, 33, 17, 5, False, 16),
    (7, 1, 16, 50, 3, 1, True, 32),
]


def _run(q_THQ, keys, k, block_n, **launch):
    vals, ids = fused_retrieval(q_THQ.to(DEVICE), [t.to(DEVICE) for t in keys], k, block_t=16, block_n=block_n, **launch)
    return vals.cpu(), ids.cpu()


@pytest.mark.parametrize("T,H,q,n0,n1,k,per_head,block_n", CASES, ids=str)
def test_integer_scores_match_reference_exactly(T, H, q, n0, n1, k, per_head, block_n):
    q_THQ, keys = _inputs(T, H, q, n0, n1, per_head, integer=True, seed=T + n0 + k)
    vals, ids = _run(q_THQ, keys, k, block_n)
    want = fused_retrieval_reference(q_THQ, keys, k)
    assert torch.equal(ids, want[1])
    assert torch.equal(vals, want[0])


def test_sort_instead_of_bitonic_merge_gives_the_same_result(monkeypatch):
    # Triton releases without tl.bitonic_merge order the running list with a full sort instead
    q_THQ, keys = _inputs(21, 1, 16, 70, 40, per_head=True, integer=True, seed=4)
    monkeypatch.setattr(triton_retrieval, "HAS_BITONIC_MERGE", False)
    vals, ids = _run(q_THQ, keys, 16, 32)
    want = fused_retrieval_reference(q_THQ, keys, 16)
    assert torch.equal(ids, want[1]) and torch.equal(vals, want[0])


@pytest.mark.parametrize("k", [1, 3, 8, 16])
def test_candidate_pairs_are_those_that_can_reach_the_top_k(k):
    pairs = triton_retrieval._candidate_pairs(k, triton_retrieval.triton.next_power_of_2(k), torch.device("cpu"))
    pairs = pairs.T.tolist()
    real = [(i, j) for i, j in pairs if i >= 0]
    assert sorted(real) == [(i, j) for i in range(k) for j in range(k) if (i + 1) * (j + 1) <= k]
    assert len(pairs) & (len(pairs) - 1) == 0 and len(pairs) >= k  # a power of two holding the top k
    if k == 16:
        assert len(real) == 50
    # built once per (k, KP, device): a per-call build would copy it to the GPU and wait for the queue
    cpu = torch.device("cpu")
    assert triton_retrieval._candidate_pairs(k, k, cpu) is triton_retrieval._candidate_pairs(k, k, cpu)


def test_pruned_merge_differs_only_where_a_sum_rounds_to_a_tie():
    # The documented one-ulp gap: 1 - 2^-24 + 4 rounds to 5.0, tying pair (rank 1, rank 1) of sub-keys
    # (0, 2) with dominating pairs of score 5.0; the full grid picks it on id, the pruned merge never sees
    # it. The values (the top-k scores) are the same; only which of the tied experts is returned differs.
    q_THQ = torch.zeros(1, 1, 32)
    q_THQ[0, 0, 0] = q_THQ[0, 0, 16] = 1.0
    keys0, keys1 = torch.zeros(8, 16), torch.zeros(8, 16)
    keys0[5, 0], keys0[0, 0] = 1.0, 1 - 2**-24
    keys1[1, 0] = keys1[2, 0] = 4.0
    vals, ids = _run(q_THQ, [keys0, keys1], 3, 16)
    want_vals, want_ids = fused_retrieval_reference(q_THQ, [keys0, keys1], 3)
    assert torch.equal(vals, want_vals) and (vals == 5.0).all()
    assert ids.tolist() == [[[1, 41, 42]]] and want_ids.tolist() == [[[1, 2, 41]]]


def test_all_tied_scores_return_the_lowest_ids():
    q_THQ, keys = _inputs(20, 1, 16, 50, 40, per_head=False, integer=True, seed=1)
    vals, ids = _run(torch.zeros_like(q_THQ), keys, 8, 16)
    assert torch.equal(ids, torch.arange(8).expand(20, 1, 8))
    assert (vals == 0).all()


def test_gaussian_scores_match_reference_to_rounding():
    T, H, q, n, k = 16, 2, 32, 96, 16
    q_THQ, keys = _inputs(T, H, q, n, n, per_head=True, integer=False, seed=3)
    vals, ids = _run(q_THQ, keys, k, 64)
    want_vals, want_ids = fused_retrieval_reference(q_THQ, keys, k)
    torch.testing.assert_close(vals, want_vals, rtol=1e-5, atol=1e-5)
    # Each returned id really scores its returned value (recomputed the unfused way).
    s0 = torch.einsum("thq,hnq->thn", q_THQ[..., :q], keys[0])
    s1 = torch.einsum("thq,hnq->thn", q_THQ[..., q:], keys[1])
    recomputed = s0.gather(-1, ids // n) + s1.gather(-1, ids % n)
    torch.testing.assert_close(vals, recomputed, rtol=1e-5, atol=1e-5)
    assert (ids == want_ids).float().mean() > 0.99  # only near-ties may differ
    assert all(len(set(row.tolist())) == k for row in ids.view(-1, k))


def test_applies_only_where_the_kernel_is_valid():
    q_THQ, keys = _inputs(4, 2, 16, 8, 8, per_head=False, integer=False, seed=0)
    assert not fused_retrieval_applies(q_THQ, keys, 4)  # CPU tensors
    if not torch.cuda.is_available():
        return
    qc, kc = q_THQ.cuda(), [t.cuda() for t in keys]
    assert fused_retrieval_applies(qc, kc, 4)
    assert not fused_retrieval_applies(qc.double(), [t.double() for t in kc], 4)  # fp64
    assert not fused_retrieval_applies(qc, kc, 17)  # k above MAX_FUSED_K
    assert not fused_retrieval_applies(qc, [*kc, kc[0]], 4)  # three parts
