"""llm/ops/triton_topk.py: the Triton top-k kernel equals the stable-sort reference (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from llm.ops import triton_topk
from llm.ops.triton_topk import topk_positions, topk_positions_reference

pytestmark = pytest.mark.skipif(triton_topk.triton is None, reason="triton is not installed")
# CI runs the kernel through the interpreter on CPU tensors; on a GPU (TRITON_INTERPRET=0) it runs compiled.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# (rows, columns, k): widths that are and are not powers of two, k = C, a single row, rows not a
# multiple of the row block.
SHAPES = [(1, 1, 1), (5, 7, 3), (9, 16, 16), (33, 100, 8), (17, 256, 16), (6, 1024, 16), (3, 1500, 5)]


@pytest.mark.parametrize("R,C,k", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_kernel_matches_reference(R, C, k, ties):
    gen = torch.Generator().manual_seed(R * 1000 + C + k)
    if ties:  # small integers: many exact ties, broken by the lowest position
        scores = torch.randint(-3, 4, (R, C), generator=gen).float()
    else:
        scores = torch.randn(R, C, generator=gen)
    got = triton_topk.topk_positions_triton(scores.to(DEVICE), k, tile_elements=4096).cpu()
    want = topk_positions_reference(scores, k)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dtypes_and_strided_rows(dtype):
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(12, 80, generator=gen).to(dtype)
    scores = wide[:, 3:67]  # row stride 80, unit column stride
    got = triton_topk.topk_positions_triton(scores.to(DEVICE), 10).cpu()
    assert torch.equal(got, topk_positions_reference(scores, 10))


def test_infinite_scores_are_selected_without_repeats():
    scores = torch.tensor([[float("-inf")] * 5, [1.0, float("-inf"), float("inf"), 0.0, float("-inf")]])
    got = triton_topk.topk_positions_triton(scores.to(DEVICE), 5).cpu()
    assert torch.equal(got, topk_positions_reference(scores, 5))
    assert all(len(set(row.tolist())) == 5 for row in got)


def test_nan_never_repeats_or_escapes_the_row():
    scores = torch.tensor([[float("nan"), 2.0, float("nan"), 1.0]])
    got = triton_topk.topk_positions_triton(scores.to(DEVICE), 4).cpu()
    assert got[0, :2].tolist() == [1, 3]  # numbers first, then the NaN positions
    assert sorted(got[0].tolist()) == [0, 1, 2, 3]


def test_dispatch_uses_reference_on_cpu_for_any_shape():
    scores = torch.randn(2, 3, 5000)
    assert torch.equal(topk_positions(scores, 4), topk_positions_reference(scores, 4))


@pytest.mark.parametrize("tile,warps", [(1024, None), (256, 1), (4096, 2)], ids=str)
def test_values_and_launch_configs_match_reference(tile, warps):
    gen = torch.Generator().manual_seed(tile)
    scores = torch.randint(-4, 5, (19, 300), generator=gen).float() * 0.5  # many ties
    scores[0, :5] = torch.tensor([-0.0, 0.0, -0.0, 2.0, 0.0])  # -0.0 ties with +0.0 (lowest position wins)
    vals, pos = triton_topk.topk_triton(scores.to(DEVICE), 12, tile_elements=tile, num_warps=warps)
    want_vals, want_pos = triton_topk.topk_reference(scores, 12)
    assert torch.equal(pos.cpu(), want_pos)
    assert torch.equal(vals.cpu(), want_vals) and vals.dtype == torch.float32


def test_topk_dispatch_returns_values_and_positions():
    scores = torch.randn(2, 3, 40)
    vals, pos = triton_topk.topk(scores, 6)
    assert torch.equal(pos, topk_positions_reference(scores, 6))
    assert torch.equal(vals, scores.gather(-1, pos))
