"""Fused product-key retrieval for two parts: sub-key scores and per-part top-k in one kernel, the merge
in a second.

The unfused path (``llm.models.product_keys.product_topk``) writes each part's dense (T, H, n) fp32
scores from a GEMM (2 x 134 MB at the paper's size), reads them back in a top-k kernel that extracts the
maximum k times from every n-wide row, then merges the two k-lists in a third kernel. Here one program
takes BLOCK_T tokens of one head and one part and walks the part's n sub-keys in BLOCK_N chunks: a
chunk's scores come from a tensor-core dot and stay in registers, are packed with their position into
int64 keys (``pack_score_id``: one integer order = score descending, then position ascending) and cut to
the chunk's top-KP by a bitonic top-k (``tl.topk``); the running top-KP (kept ascending) absorbs it by
one bitonic half-cleaner step (elementwise max against the descending chunk list) and a bitonic merge
of KP. Nothing of size n leaves the program: each part's KP keys go to a (T, H, 2, KP) buffer, and the
merge kernel takes the top-k over the pairs (i, j) of the two lists' i-th and j-th best that can reach
the top k, (i + 1) * (j + 1) <= k (50 pairs at k = 16, of the 256 in the full grid).

Measured on an H100 at the paper's size (benchmarks/RESULTS.md): 0.495 + 0.104 ms, against 0.81-0.83 ms
for one kernel doing both parts and a top-k of the whole 16 x 16 grid (0.33 ms of it the grid's top-k,
seen when the parts ran as their own kernel). Variants kept only in the project's history: a threshold
(the KP-th largest chunk maximum) with KP extraction passes over the candidates above it, 1.37 vs 0.97 ms
(commit 8231eff); 32-bit chunk keys (the score with its low log2(BLOCK_N) mantissa bits replaced by the
position), 0.69 vs 0.86 ms but inexact (scores truncated to 17 mantissa bits, commit d79105c); the same
with the winners' exact scores gathered back (``tl.gather``), 1.10 vs 0.88 ms in the layer's profile;
runs of 16 sub-keys cut to their top 4 before the chunk's top-k (exact, checked per row with a re-run),
1.31-1.45 vs 0.81 ms although it does half the compare-exchanges.

Exactness: each part's list is the exact top-KP of the scores this kernel computes (ties to the lower
flat id, as everywhere in routing). Those scores come from ``tl.dot`` in ``tf32x3`` (three TF32
tensor-core products, error ~1e-6 relative, like an fp32 GEMM's); an fp32 cuBLAS GEMM rounds
differently, so the two paths can pick different experts where two candidates' scores are within
rounding of each other (the values of the k-th best still agree to rounding). The merge skips the pairs
that a full grid would rank below k dominating ones, which is exact unless rounding intervenes: a
skipped pair whose fp32 sum rounds to a tie with a dominating pair's sum and wins on id (the one-ulp case
``llm/models/product_keys.py`` describes for its own pruning). Where the dots and the sums are exact
(small integers, used by the tests) the ids equal the reference's.

Shape legend: T tokens, H heads, q query width of one part, n sub-keys of a part, k kept experts,
KP = next power of two of min(k, max(n0, n1)) (at least 2) candidates kept per part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llm.ops.triton_peer_routing import MAX_FLAT_ID, merge_topk_reference
from llm.ops.triton_topk import topk_reference

try:  # Triton is an optional dependency (the dev extra, or a CUDA install of torch).
    import triton
    import triton.language as tl

    from llm.ops.triton_topk import _EMPTY_KEY, pack_score_id, unpack_score_id
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

# Largest k the fused kernels take (the largest measured; larger k runs the unfused kernels).
MAX_FUSED_K = 16
# Query widths of one part the dot accepts (tl.dot needs an inner size >= 16; powers of two keep the
# tile unmasked).
FUSED_PART_WIDTHS = (16, 32, 64, 128)
# Launch defaults: tokens per program, sub-keys per chunk, warps (the merge kernel uses BLOCK_T and
# NUM_WARPS too). The fastest of the H100 sweep of the two kernels in benchmarks/RESULTS.md (T=4096, H=8,
# n=1024, q=64, k=16): (128, 32, 4) 0.566 ms; (64, 32, 4) 0.580, (64, 64, 4) 0.605, (32, 32, 2) 0.636,
# (128, 64, 4) 0.819, (64, 64, 8) 1.126 ms.
BLOCK_T = 128
BLOCK_N = 32
NUM_WARPS = 4
# Score dots: three TF32 tensor-core products, ~fp32 accuracy (see the module docstring).
PRECISION = "tf32x3"
# tl.bitonic_merge sorts the running list's bitonic half-cleaner output in log2(KP) stages (4 at k = 16)
# instead of a sort's 10: 0.864 -> 0.813 ms at the paper's size on an H100 (Triton 3.6). Releases
# without it sort.
HAS_BITONIC_MERGE = triton is not None and hasattr(tl, "bitonic_merge")


def fused_retrieval_reference(q_THQ: Tensor, sub_keys: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Two-part product-key top-k the unfused way: einsum scores, per-part stable top-k, merge.

    q_THQ (T, H, 2q); sub_keys two tensors, (n_p, q) shared by heads or (H, n_p, q) per head.
    Returns (scores (T, H, k), int64 flat ids (T, H, k)), by score descending, ties to the lower id.
    """
    T, H, _ = q_THQ.shape
    q = sub_keys[0].shape[-1]
    lists = []
    for q_THq, keys in zip(q_THQ.split(q, dim=-1), sub_keys, strict=True):
        pattern = "thq,nq->thn" if keys.dim() == 2 else "thq,hnq->thn"
        scores_THn = torch.einsum(pattern, q_THq, keys)
        lists.append(topk_reference(scores_THn.reshape(T * H, -1), min(k, keys.shape[-2])))
    (a_vals, a_pos), (b_vals, b_pos) = lists
    vals, ids = merge_topk_reference(a_vals, a_pos, b_vals, b_pos, sub_keys[1].shape[-2], k)
    return vals.view(T, H, k), ids.view(T, H, k)


if triton is not None:

    @triton.jit
    def _absorb(best, desc, HAS_MERGE: tl.constexpr):
        """Top-KP of best (ascending) and desc (descending), ascending.

        The two lists side by side form a bitonic sequence; its half-cleaner step (elementwise max) keeps
        exactly the top-KP of the union as a bitonic list (ids make keys unique; repeated empty padding
        keys do no harm to a sorting network), which a bitonic
        merge (log KP stages; a full sort where Triton lacks ``tl.bitonic_merge``) puts in order.
        """
        if HAS_MERGE:
            return tl.bitonic_merge(tl.maximum(best, desc))
        else:
            return tl.sort(tl.maximum(best, desc))

    @triton.jit
    def _part_topk(
        q_ptr,  # (T, H, 2q) fp32 contiguous, already offset to this head's part
        keys_ptr,  # (n, q) fp32 contiguous, already offset to this head's table
        t0,
        T,
        H,
        n,
        Q: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        HAS_MERGE: tl.constexpr,
    ):
        """(BLOCK_T, KP) packed keys of this part's top-KP sub-keys per token, in ascending order."""
        rows = t0 + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, Q)
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * (H * 2 * Q) + dims[None, :], mask=(rows < T)[:, None], other=0.0)
        best = tl.full((BLOCK_T, KP), _EMPTY_KEY, tl.int64)  # running top-KP, ascending
        for c0 in range(0, n, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n
            keys_T = tl.load(keys_ptr + cols[None, :] * Q + dims[:, None], mask=col_ok[None, :], other=0.0)
            s = tl.dot(q, keys_T, input_precision=PRECISION)  # (BLOCK_T, BLOCK_N) fp32
            packed = tl.where(col_ok[None, :], pack_score_id(s, cols[None, :]), _EMPTY_KEY)
            best = _absorb(best, tl.topk(packed, KP), HAS_MERGE)  # the chunk cut to its own top-KP first
        return best

    @triton.jit
    def _store_top(cand, vals_ptr, ids_ptr, t0, h, T, H, K: tl.constexpr, KOUT: tl.constexpr, BLOCK_T: tl.constexpr):
        """Top-K of the (BLOCK_T, C) candidate keys, stored as (score, flat id) in rows t0.., head h."""
        top = tl.topk(cand, KOUT)  # (BLOCK_T, KOUT), descending
        val, flat = unpack_score_id(top)
        rows = t0 + tl.arange(0, BLOCK_T)
        slots = tl.arange(0, KOUT)
        out = (rows.to(tl.int64)[:, None] * H + h) * K + slots[None, :]
        ok = (rows < T)[:, None] & (slots < K)[None, :]
        tl.store(vals_ptr + out, val, mask=ok)
        tl.store(ids_ptr + out, flat, mask=ok)

    @triton.jit
    def _part_lists_kernel(
        q_ptr,  # (T, H, 2q) fp32 contiguous
        keys0_ptr,  # (n0, q) or (H, n0, q) fp32 contiguous
        keys1_ptr,  # (n1, q) or (H, n1, q) fp32 contiguous
        lists_ptr,  # (T, H, 2, KP) int64 out: each part's top-KP packed keys, ascending
        T,
        H,
        n0,
        n1,
        head_stride0,
        head_stride1,
        Q: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        HAS_MERGE: tl.constexpr,
    ):
        """One program per (token block, head, part): the part's top-KP keys, ascending, into lists."""
        t0 = tl.program_id(0) * BLOCK_T
        h = tl.program_id(1).to(tl.int64)
        part = tl.program_id(2)
        q_head = q_ptr + h * 2 * Q
        if part == 0:
            best = _part_topk(q_head, keys0_ptr + h * head_stride0, t0, T, H, n0, Q, KP, BLOCK_T, BLOCK_N,
                              PRECISION, HAS_MERGE)  # fmt: skip
        else:
            best = _part_topk(q_head + Q, keys1_ptr + h * head_stride1, t0, T, H, n1, Q, KP, BLOCK_T, BLOCK_N,
                              PRECISION, HAS_MERGE)  # fmt: skip
        rows = t0 + tl.arange(0, BLOCK_T)
        slots = tl.arange(0, KP)
        out = ((rows.to(tl.int64)[:, None] * H + h) * 2 + part) * KP + slots[None, :]
        tl.store(lists_ptr + out, best, mask=(rows < T)[:, None])

    @triton.jit
    def _merge_lists_kernel(
        lists_ptr,  # (T, H, 2, KP) int64 from _part_lists_kernel
        pairs_ptr,  # (2, C) int32: ranks (i, j) of the candidate pairs, -1 for padding
        vals_ptr,  # (T, H, K) fp32 out
        ids_ptr,  # (T, H, K) int64 out
        T,
        H,
        n1,
        K: tl.constexpr,
        KP: tl.constexpr,
        KOUT: tl.constexpr,
        C: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """The top-K over the C candidate pairs (i, j) of the parts' i-th and j-th best that can reach the
        top K, (i + 1) * (j + 1) <= K (50 of 256 at K = 16)."""
        t0 = tl.program_id(0) * BLOCK_T
        h = tl.program_id(1).to(tl.int64)
        rows = t0 + tl.arange(0, BLOCK_T)
        c = tl.arange(0, C)
        pi = tl.load(pairs_ptr + c)
        pj = tl.load(pairs_ptr + C + c)
        ok = (rows < T)[:, None] & (pi >= 0)[None, :]
        base = ((rows.to(tl.int64) * H + h) * 2 * KP)[:, None]
        # lists are ascending: rank i sits at KP - 1 - i
        a = tl.load(lists_ptr + base + (KP - 1 - pi)[None, :], mask=ok, other=_EMPTY_KEY)
        b = tl.load(lists_ptr + base + KP + (KP - 1 - pj)[None, :], mask=ok, other=_EMPTY_KEY)
        a_val, a_pos = unpack_score_id(a)
        b_val, b_pos = unpack_score_id(b)
        cand = pack_score_id(a_val + b_val, a_pos * n1 + b_pos)  # (BLOCK_T, C), ids row-major over the parts
        _store_top(tl.where((a != _EMPTY_KEY) & (b != _EMPTY_KEY), cand, _EMPTY_KEY), vals_ptr, ids_ptr, t0, h,
                   T, H, K, KOUT, BLOCK_T)  # fmt: skip


# (k, KP, device) -> the merge's candidate-pair table. A plain dict rather than functools.cache: under
# torch.compile, Dynamo ignores functools.cache and would trace the table's construction, a pageable
# host-to-device copy (which waits for the GPU queue) on every step; a global dict it guards and reads.
_PAIR_TABLES: dict[tuple[int, int, torch.device], Tensor] = {}


def _candidate_pairs(k: int, kp: int, device: torch.device) -> Tensor:
    """(2, C) int32 ranks (i, j) with (i + 1) * (j + 1) <= k, i, j < kp, padded with -1 to a power of two
    (at least next_power_of_2(k)): a pair outside can never reach the top k, as the (i + 1) * (j + 1) - 1
    other pairs (i', j') with i' <= i, j' <= j score at least as high (ties: lower ids). Built once per
    (k, kp, device)."""
    key = (k, kp, torch.device(device))
    if key not in _PAIR_TABLES:
        pairs = [(i, j) for i in range(kp) for j in range(kp) if (i + 1) * (j + 1) <= k]
        size = max(2, triton.next_power_of_2(k), triton.next_power_of_2(len(pairs)))
        pairs += [(-1, -1)] * (size - len(pairs))
        _PAIR_TABLES[key] = torch.tensor(pairs, dtype=torch.int32, device=device).T.contiguous()
    return _PAIR_TABLES[key]


def fused_retrieval_applies(q_THQ: Tensor, sub_keys: Sequence[Tensor], k: int) -> bool:
    """True where ``fused_retrieval`` runs the kernel: CUDA fp32, two parts of one supported width,
    k <= MAX_FUSED_K, and flat ids that fit the packed keys' 31 bits."""
    if triton is None or not hasattr(tl, "topk") or len(sub_keys) != 2 or not q_THQ.is_cuda or q_THQ.dim() != 3:
        return False  # Triton releases without tl.topk (bitonic) run the unfused kernels
    q = sub_keys[0].shape[-1]
    n0, n1 = sub_keys[0].shape[-2], sub_keys[1].shape[-2]
    return (
        all(t.dtype == torch.float32 and t.is_cuda for t in (q_THQ, *sub_keys))
        and q in FUSED_PART_WIDTHS
        and sub_keys[1].shape[-1] == q
        and q_THQ.shape[-1] == 2 * q
        and sub_keys[0].dim() == sub_keys[1].dim()
        and 1 <= k <= min(MAX_FUSED_K, n0 * n1)
        and n0 * n1 <= MAX_FLAT_ID + 1
        and q_THQ.shape[0] * q_THQ.shape[1] > 0
    )


def fused_retrieval(
    q_THQ: Tensor,
    sub_keys: Sequence[Tensor],
    k: int,
    block_t: int = BLOCK_T,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``fused_retrieval_reference`` (no gradient; values in fp32), two kernel launches.

    The caller checks ``fused_retrieval_applies``. ``block_t``, ``block_n`` and ``num_warps`` set the
    launch (benchmarks sweep them); the defaults are the fastest measured.
    """
    assert triton is not None, "triton is not installed"
    T, H, _ = q_THQ.shape
    q = sub_keys[0].shape[-1]
    n0, n1 = sub_keys[0].shape[-2], sub_keys[1].shape[-2]
    # tl.topk needs power-of-two widths; k = 1 is widened to 2 (older Triton releases reject k = 1)
    kp = max(2, triton.next_power_of_2(min(k, max(n0, n1))))
    block_n = max(block_n, kp)  # a chunk must hold the KP it keeps
    vals = torch.empty(T, H, k, dtype=torch.float32, device=q_THQ.device)
    ids = torch.empty(T, H, k, dtype=torch.int64, device=q_THQ.device)
    keys0, keys1 = (t.detach().contiguous() for t in sub_keys)
    per_head = keys0.dim() == 3
    q_THQ = q_THQ.detach().contiguous()
    head_strides = (n0 * q if per_head else 0, n1 * q if per_head else 0)
    kout = max(2, triton.next_power_of_2(k))
    lists = torch.empty(T, H, 2, kp, dtype=torch.int64, device=q_THQ.device)
    _part_lists_kernel[(triton.cdiv(T, block_t), H, 2)](
        q_THQ, keys0, keys1, lists, T, H, n0, n1, *head_strides,
        Q=q, KP=kp, BLOCK_T=block_t, BLOCK_N=block_n, PRECISION=PRECISION, HAS_MERGE=HAS_BITONIC_MERGE,
        num_warps=num_warps,
    )  # fmt: skip
    pairs = _candidate_pairs(k, kp, q_THQ.device)  # built (and copied to the device) once
    _merge_lists_kernel[(triton.cdiv(T, block_t), H)](
        lists, pairs, vals, ids, T, H, n1, K=k, KP=kp, KOUT=kout, C=pairs.shape[1], BLOCK_T=block_t,
        num_warps=num_warps,
    )  # fmt: skip
    return vals, ids
