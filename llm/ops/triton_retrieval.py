"""Fused product-key retrieval for two parts: sub-key scores, per-part top-k and the merge in one kernel.

The unfused path (``llm.models.product_keys.product_topk``) writes each part's dense (T, H, n) fp32
scores from a GEMM (2 x 134 MB at the paper's size), reads them back in a top-k kernel that extracts the
maximum k times from every n-wide row, then merges the two k-lists in a third kernel. Here one program
takes BLOCK_T tokens of one head; for each part it scores the sub-keys chunk by chunk with tensor-core
dots (the scores never leave registers), finds a threshold that at most a few dozen scores per row
reach, compacts those candidates into a small per-program scratch and extracts the top-KP from them
alone (``_part_topk`` has the details and the exact slow path). The two parts' lists then form a
KP x KP grid of sums, and the grid's top-k is written out. Scores and candidates are packed with their
position into int64 keys (``pack_score_id``: one integer order = score descending, then position
ascending), so each extraction is one ``max``.

Exactness: the result is the exact top-k of the scores this kernel computes (ties to the lower flat id,
as everywhere in routing). Those scores come from ``tl.dot`` in ``tf32x3`` (three TF32 tensor-core
products, error ~1e-6 relative, like an fp32 GEMM's); an fp32 cuBLAS GEMM rounds differently, so the two
paths can pick different experts where two candidates' scores are within rounding of each other (the
values of the k-th best still agree to rounding). Scores that the dot computes exactly (small integers,
used by the tests) give identical ids.

Shape legend: T tokens, H heads, q query width of one part, n sub-keys of a part, k kept experts,
KP = next power of two of min(k, n) (at least 2) candidates kept per part, CAP candidate slots per row.
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

# Largest k the fused kernel takes: its merge grid holds KP * KP int64 keys per token in registers.
MAX_FUSED_K = 32
# Query widths of one part the dot accepts (tl.dot needs an inner size >= 16; powers of two keep the
# tile unmasked).
FUSED_PART_WIDTHS = (16, 32, 64, 128)
# Launch defaults: tokens per program and warps (see benchmarks/routing_topk.py).
BLOCK_T = 64
NUM_WARPS = 4
# Widest chunk of sub-keys scored at once, and most chunks per part (their maxima stay in registers).
MAX_BLOCK_N = 128
MAX_GROUPS = 64
# Merge-grid keys (int64) held at once: MERGE_ROWS tokens x KP * KP candidates.
_MERGE_TILE = 4096
# Score dots: three TF32 tensor-core products, ~fp32 accuracy (see the module docstring).
PRECISION = "tf32x3"


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
    def _chunk_scores(q, keys_ptr, c0, n, dims, Q: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Scores of sub-keys c0 .. c0 + BLOCK_N: q (BLOCK_T, Q) -> (fp32 (BLOCK_T, BLOCK_N), cols, col_ok)."""
        cols = c0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        # loaded row-major (each sub-key's Q values contiguous: coalesced) and transposed for the dot
        keys = tl.load(keys_ptr + cols[:, None] * Q + dims[None, :], mask=col_ok[:, None], other=0.0)
        return tl.dot(q, tl.trans(keys), input_precision=PRECISION), cols, col_ok

    @triton.jit
    def _extract(keys, KP: tl.constexpr):
        """(R, C) unique int64 keys -> (R, KP) the KP largest, descending (KP passes of max + knock-out)."""
        slots = tl.arange(0, KP)
        best = tl.full((keys.shape[0], KP), _EMPTY_KEY, tl.int64)
        for j in tl.static_range(KP):
            top = tl.max(keys, axis=1)
            best = tl.where(slots[None, :] == j, top[:, None], best)
            keys = tl.where(keys == top[:, None], _EMPTY_KEY, keys)
        return best

    @triton.jit
    def _part_topk(
        q_ptr,  # (T, H, 2q) fp32 contiguous, already offset to this head's part
        keys_ptr,  # (n, q) fp32 contiguous, already offset to this head's table
        cand_ptr,  # (BLOCK_T, CAP) int64 scratch of this program and part
        t0,
        T,
        H,
        n,
        Q: tl.constexpr,
        KP: tl.constexpr,
        CAP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        GROUPS: tl.constexpr,  # power of two >= the number of BLOCK_N chunks; 0: every sub-key is a candidate
        PRECISION: tl.constexpr,
    ):
        """(BLOCK_T, KP) packed keys of this part's top-KP sub-keys per token, sorted descending, and
        whether the candidates fitted (False: the slow path ran).

        Pass 1 takes each chunk's maximum score; the KP-th largest chunk maximum ``thr`` is a lower bound
        on the KP-th largest score (KP distinct chunks each hold a score >= thr). Pass 2 recomputes the
        scores and compacts the candidates (score >= thr; ~21 per row for Gaussian scores with 32 chunks)
        into scratch. KP extraction passes over those CAP slots replace KP passes over all n scores. Where
        a row's candidates do not fit (many ties at thr) or are too few (NaN scores), the whole block takes
        the exact slow path: KP passes over all chunks, each taking the largest key below the last.
        """
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        dims = tl.arange(0, Q)
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * (H * 2 * Q) + dims[None, :], mask=row_ok[:, None], other=0.0)
        if GROUPS > 0:  # pass 1: chunk maxima -> threshold
            group_ids = tl.arange(0, GROUPS)
            group_max = tl.full((BLOCK_T, GROUPS), _EMPTY_KEY, tl.int64)
            for c in range(0, tl.cdiv(n, BLOCK_N)):
                s, cols, col_ok = _chunk_scores(q, keys_ptr, c * BLOCK_N, n, dims, Q, BLOCK_N, PRECISION)
                chunk_max = tl.max(tl.where(col_ok[None, :], s, float("-inf")), axis=1)
                # packed with the chunk id: equal maxima stay distinct, so exactly KP chunks are counted
                group_max = tl.where(group_ids[None, :] == c, pack_score_id(chunk_max, tl.zeros((BLOCK_T,), tl.int32) + c)[:, None], group_max)
            thr, _ = unpack_score_id(tl.min(_extract(group_max, KP), axis=1))  # (BLOCK_T,) fp32
        else:
            thr = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        # pass 2: compact the candidates into scratch, in chunk order
        slots = tl.arange(0, CAP)
        count = tl.zeros((BLOCK_T,), tl.int32)
        for c0 in range(0, n, BLOCK_N):
            s, cols, col_ok = _chunk_scores(q, keys_ptr, c0, n, dims, Q, BLOCK_N, PRECISION)
            keep = (s >= thr[:, None]) & col_ok[None, :] & row_ok[:, None]
            at = count[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
            tl.store(cand_ptr + tl.arange(0, BLOCK_T)[:, None] * CAP + at, pack_score_id(s, cols[None, :]),
                     mask=keep & (at < CAP))  # fmt: skip
            count += tl.sum(keep.to(tl.int32), axis=1)
        need = tl.minimum(n, KP)
        count = tl.where(row_ok, count, need)
        fits = (tl.max(count, axis=0) <= CAP) & (tl.min(count, axis=0) >= need)
        tl.debug_barrier()  # the candidates were stored by other threads of this program
        if fits:
            cand = tl.load(cand_ptr + tl.arange(0, BLOCK_T)[:, None] * CAP + slots[None, :],
                           mask=slots[None, :] < count[:, None], other=_EMPTY_KEY)  # fmt: skip
            best = _extract(cand, KP)
        else:  # exact for any scores: KP scans, each for the largest key below the previous one
            kp_slots = tl.arange(0, KP)
            best = tl.full((BLOCK_T, KP), _EMPTY_KEY, tl.int64)
            prev = tl.full((BLOCK_T,), 9223372036854775807, tl.int64)
            for j in tl.static_range(KP):
                cur = tl.full((BLOCK_T,), _EMPTY_KEY, tl.int64)
                for c0 in range(0, n, BLOCK_N):
                    s, cols, col_ok = _chunk_scores(q, keys_ptr, c0, n, dims, Q, BLOCK_N, PRECISION)
                    packed = tl.where(col_ok[None, :], pack_score_id(s, cols[None, :]), _EMPTY_KEY)
                    cur = tl.maximum(cur, tl.max(tl.where(packed < prev[:, None], packed, _EMPTY_KEY), axis=1))
                best = tl.where(kp_slots[None, :] == j, cur[:, None], best)
                prev = cur
        return best, fits

    @triton.jit
    def _fused_retrieval_kernel(
        q_ptr,  # (T, H, 2q) fp32 contiguous
        keys0_ptr,  # (n0, q) or (H, n0, q) fp32 contiguous
        keys1_ptr,  # (n1, q) or (H, n1, q) fp32 contiguous
        vals_ptr,  # (T, H, K) fp32 out
        ids_ptr,  # (T, H, K) int64 out
        scratch_ptr,  # (programs, 2 * BLOCK_T * (CAP + KP)) int64
        slow_ptr,  # (programs,) int32 out: bit p set where part p took the slow path
        T,
        H,
        n0,
        n1,
        head_stride0,  # n0 * q for per-head sub-keys, 0 when shared
        head_stride1,
        Q: tl.constexpr,
        K: tl.constexpr,
        K_OUT: tl.constexpr,  # next power of two of K
        KP: tl.constexpr,
        CAP: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N0: tl.constexpr,
        BLOCK_N1: tl.constexpr,
        GROUPS0: tl.constexpr,
        GROUPS1: tl.constexpr,
        MERGE_ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        t0 = tl.program_id(0) * BLOCK_T
        h = tl.program_id(1).to(tl.int64)
        program = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
        cand = scratch_ptr + program * (2 * BLOCK_T * (CAP + KP))
        lists = cand + 2 * BLOCK_T * CAP  # (2, BLOCK_T, KP): each part's top-KP, for the merge
        q_head = q_ptr + h * 2 * Q
        rows = tl.arange(0, BLOCK_T)
        kp_slots = tl.arange(0, KP)
        a, fits0 = _part_topk(q_head, keys0_ptr + h * head_stride0, cand, t0, T, H, n0,
                       Q, KP, CAP, BLOCK_T, BLOCK_N0, GROUPS0, PRECISION)  # fmt: skip
        tl.store(lists + rows[:, None] * KP + kp_slots[None, :], a)
        b, fits1 = _part_topk(q_head + Q, keys1_ptr + h * head_stride1, cand + BLOCK_T * CAP, t0, T, H, n1,
                       Q, KP, CAP, BLOCK_T, BLOCK_N1, GROUPS1, PRECISION)  # fmt: skip
        tl.store(lists + BLOCK_T * KP + rows[:, None] * KP + kp_slots[None, :], b)
        tl.store(slow_ptr + program, (fits0 == 0).to(tl.int32) + 2 * (fits1 == 0).to(tl.int32))
        tl.debug_barrier()
        # Merge MERGE_ROWS tokens at a time: the (rows, KP * KP) grid of int64 keys must fit in registers.
        sub = tl.arange(0, MERGE_ROWS)
        out_slots = tl.arange(0, K_OUT)
        for r0 in tl.static_range(0, BLOCK_T, MERGE_ROWS):
            a = tl.load(lists + (r0 + sub)[:, None] * KP + kp_slots[None, :])
            b = tl.load(lists + BLOCK_T * KP + (r0 + sub)[:, None] * KP + kp_slots[None, :])
            a_val, a_pos = unpack_score_id(a)
            b_val, b_pos = unpack_score_id(b)
            # (MERGE_ROWS, KP, KP) grid: sums formed as a + b in fp32, ids row-major over (part 0, part 1)
            grid_ok = (a != _EMPTY_KEY)[:, :, None] & (b != _EMPTY_KEY)[:, None, :]
            grid = pack_score_id(a_val[:, :, None] + b_val[:, None, :], a_pos[:, :, None] * n1 + b_pos[:, None, :])
            top = _extract(tl.reshape(tl.where(grid_ok, grid, _EMPTY_KEY), (MERGE_ROWS, KP * KP)), K_OUT)
            val, flat = unpack_score_id(top)
            tok = t0 + r0 + sub
            out = (tok.to(tl.int64)[:, None] * H + h) * K + out_slots[None, :]
            ok = (tok < T)[:, None] & (out_slots < K)[None, :]
            tl.store(vals_ptr + out, val, mask=ok)
            tl.store(ids_ptr + out, flat, mask=ok)


def _part_launch(n: int, kp: int, cap: int) -> tuple[int, int] | None:
    """(BLOCK_N, GROUPS) for a part of n sub-keys, or None where the kernel does not apply.

    Chunks of BLOCK_N sub-keys double as the threshold's groups: at least 2 * KP of them keep the
    threshold tight (~21 candidates per row for 1024 Gaussian scores, KP = 16), at least KP keep it valid,
    and at most MAX_GROUPS keep the per-row chunk maxima in registers. Parts of at most CAP sub-keys skip
    the threshold (GROUPS = 0: every sub-key is a candidate).
    """
    if n <= cap:
        return max(16, triton.next_power_of_2(n)), 0
    for per_group in (n // (2 * kp), n // kp):
        block_n = min(MAX_BLOCK_N, 1 << (per_group.bit_length() - 1)) if per_group else 0
        groups = triton.cdiv(n, block_n) if block_n >= 16 else 0
        if kp <= groups <= MAX_GROUPS:
            return block_n, triton.next_power_of_2(groups)
    return None


def _launch_sizes(n0: int, n1: int, k: int) -> tuple[int, int, tuple | None, tuple | None]:
    """(KP, CAP, part 0 launch, part 1 launch) for two parts of n0, n1 sub-keys and k experts."""
    kp = max(2, triton.next_power_of_2(min(k, max(n0, n1))))
    # 4 * KP slots hold the candidates above a tight threshold; parts too small for enough chunks of
    # >= 16 sub-keys (tl.dot's minimum) make every sub-key a candidate instead, so the slots cover them.
    small = [triton.next_power_of_2(n) for n in (n0, n1) if n <= MAX_BLOCK_N and n < 32 * kp]
    cap = max([32, 4 * kp, *small])
    return kp, cap, _part_launch(n0, kp, cap), _part_launch(n1, kp, cap)


def fused_retrieval_applies(q_THQ: Tensor, sub_keys: Sequence[Tensor], k: int) -> bool:
    """True where ``fused_retrieval`` runs the kernel: CUDA fp32, two parts of one supported width,
    k <= MAX_FUSED_K, parts of at most MAX_BLOCK_N * MAX_GROUPS sub-keys, flat ids within 31 bits."""
    if triton is None or len(sub_keys) != 2 or not q_THQ.is_cuda or q_THQ.dim() != 3:
        return False
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
        and None not in _launch_sizes(n0, n1, k)[2:]
    )


def fused_programs(T: int, H: int, block_t: int = BLOCK_T) -> int:
    """Programs of a ``fused_retrieval`` launch: token blocks x heads."""
    return triton.cdiv(T, block_t) * H


def fused_retrieval(
    q_THQ: Tensor,
    sub_keys: Sequence[Tensor],
    k: int,
    block_t: int = BLOCK_T,
    num_warps: int = NUM_WARPS,
    slow_flags: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``fused_retrieval_reference`` (no gradient; values in fp32), one kernel launch.

    The caller checks ``fused_retrieval_applies``. ``block_t`` and ``num_warps`` set the launch
    (benchmarks sweep them); the defaults are the fastest measured. ``slow_flags``, an int32 tensor of
    ``fused_programs(T, H, block_t)`` elements, receives per program a bit per part that took the slow
    path (tests and benchmarks read it).
    """
    assert triton is not None, "triton is not installed"
    T, H, _ = q_THQ.shape
    q = sub_keys[0].shape[-1]
    n0, n1 = sub_keys[0].shape[-2], sub_keys[1].shape[-2]
    kp, cap, (block_n0, groups0), (block_n1, groups1) = _launch_sizes(n0, n1, k)
    k_out = triton.next_power_of_2(k)
    programs = fused_programs(T, H, block_t)
    if slow_flags is None:
        slow_flags = torch.empty(programs, dtype=torch.int32, device=q_THQ.device)
    assert slow_flags.numel() == programs and slow_flags.dtype == torch.int32
    vals = torch.empty(T, H, k, dtype=torch.float32, device=q_THQ.device)
    ids = torch.empty(T, H, k, dtype=torch.int64, device=q_THQ.device)
    scratch = torch.empty(programs, 2 * block_t * (cap + kp), dtype=torch.int64, device=q_THQ.device)
    keys0, keys1 = (t.detach().contiguous() for t in sub_keys)
    per_head = keys0.dim() == 3
    _fused_retrieval_kernel[(triton.cdiv(T, block_t), H)](
        q_THQ.detach().contiguous(), keys0, keys1, vals, ids, scratch, slow_flags, T, H, n0, n1,
        n0 * q if per_head else 0, n1 * q if per_head else 0,
        Q=q, K=k, K_OUT=k_out, KP=kp, CAP=cap, BLOCK_T=block_t, BLOCK_N0=block_n0, BLOCK_N1=block_n1,
        GROUPS0=groups0, GROUPS1=groups1, MERGE_ROWS=max(1, min(block_t, _MERGE_TILE // (kp * kp))),
        PRECISION=PRECISION, num_warps=num_warps,
    )  # fmt: skip
    return vals, ids
