"""Expert-usage tracker: reads and resets the layers' counters, reports per layer/head, writes heatmaps."""

from __future__ import annotations

import torch
from torch import nn

from llm.training.metrics import Histogram, Image
from llm.utils.experts.tracking import ExpertUsageTracker


class CountingLayer(nn.Module):
    def __init__(self, heads: int, n: int, enabled: bool = True) -> None:
        super().__init__()
        self.register_buffer(
            "usage_counts", torch.zeros(heads, n, dtype=torch.int64) if enabled else None, persistent=False
        )


def test_collect_reports_and_resets(tmp_path):
    layer = CountingLayer(2, 16)
    layer.usage_counts[0, 3] = 10
    layer.usage_counts[1] = 1
    tracker = ExpertUsageTracker([(1, layer)], [4, 4], log_freq=5, image_dir=tmp_path)
    assert tracker.enabled and tracker.due(10) and not tracker.due(7)
    out = tracker.collect(step=10)
    assert out["experts/layer1/usage_fraction"] == 1.0
    assert out["experts/layer1/head0/usage_fraction"] == 1 / 16
    assert out["experts/layer1/head1/kl_uniform"] < 1e-12
    assert out["experts/layer1/selections"] == 26.0
    assert (
        isinstance(out["experts/layer1/count_hist"], Histogram) and len(out["experts/layer1/count_hist"].counts) <= 512
    )
    image = out["experts/layer1/heatmap"]
    assert (
        isinstance(image, Image) and (tmp_path / "layer01_step00000010.png").is_file() and image.path.endswith(".png")
    )
    assert int(layer.usage_counts.sum()) == 0


def test_disabled_layers_mean_disabled_tracker():
    tracker = ExpertUsageTracker([(0, CountingLayer(2, 16, enabled=False))], [4, 4], log_freq=1)
    assert not tracker.enabled and not tracker.due(1)


def test_no_heatmap_for_three_part_keys_and_reduce_is_applied(tmp_path):
    layer = CountingLayer(1, 8)
    layer.usage_counts += 1
    tracker = ExpertUsageTracker([(0, layer)], [2, 2, 2], log_freq=1, image_dir=tmp_path, reduce=lambda t: t * 2)
    out = tracker.collect(step=1)
    assert out["experts/layer0/selections"] == 16.0 and "experts/layer0/heatmap" not in out


def test_state_round_trip():
    layer = CountingLayer(1, 4)
    layer.usage_counts[0, 2] = 5
    tracker = ExpertUsageTracker([(0, layer)], [2, 2], log_freq=1)
    state = tracker.state_dict()
    layer.usage_counts.zero_()
    tracker.load_state_dict(state)
    assert layer.usage_counts.tolist() == [[0, 0, 5, 0]]
