"""Expert-usage statistics on hand-made count tensors."""

from __future__ import annotations

import math

import pytest
import torch

from llm.utils.experts import metrics as M


def test_uniform_counts():
    c = torch.full((16,), 3)
    assert M.usage_fraction(c) == 1.0
    assert abs(M.kl_from_uniform(c)) < 1e-12
    assert M.dead_subkeys(c, [4, 4]) == [0, 0]


def test_one_hot_expert():
    c = torch.zeros(16, dtype=torch.int64)
    c[5] = 7  # grid position (1, 1)
    assert M.usage_fraction(c) == 1 / 16
    assert math.isclose(M.kl_from_uniform(c), math.log(16))
    assert M.dead_subkeys(c, [4, 4]) == [3, 3]
    ids, shares = M.hottest(c, 2)
    assert ids[0] == 5 and shares == [1.0, 0.0]
    assert math.isnan(M.kl_from_uniform(torch.zeros(4)))


def test_dead_subkeys_in_three_parts_and_grid():
    c = torch.zeros(2, 3, 4, dtype=torch.int64)
    c[:, 0, :] = 1  # sub-key 1 and 2 of part 1 never used
    c = c.reshape(-1)
    assert M.dead_subkeys(c, [2, 3, 4]) == [0, 2, 0]
    assert [t.tolist() for t in M.subkey_counts(c, [2, 3, 4])] == [[4, 4], [8, 0, 0], [2, 2, 2, 2]]
    assert M.subkey_grid(torch.arange(6), [2, 3]).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_count_histogram_is_exact_for_small_counts_and_capped():
    hist, edges = M.count_histogram(torch.tensor([0, 0, 1, 3]))
    assert hist.tolist() == [2, 1, 0, 1] and len(edges) == 5
    hist, edges = M.count_histogram(torch.arange(10_000), max_bins=10_000)
    assert len(hist) == 512 and hist.sum() == 10_000


def test_summarize_keys():
    s = M.summarize(torch.tensor([4, 0, 0, 0]), [2, 2], top=2)
    assert s["usage_fraction"] == 0.25 and s["top1_share"] == 1.0 and s["dead_subkeys_p0"] == 1.0
    assert s["hottest"].startswith("0:1.0000") and s["selections"] == 4.0


def test_per_head_counts_are_refused_with_the_fix():
    """(H, N) tallies must be summed over heads first: per-head ids would not be expert ids."""
    per_head = torch.zeros(2, 16, dtype=torch.int64)
    per_head[:, 3] = 1
    with pytest.raises(ValueError, match=r"one \(N,\) vector; got shape \(2, 16\) \(sum over heads first\)"):
        M.summarize(per_head, [4, 4])
    assert M.hottest(per_head.sum(0), 1) == ([3], [1.0])
