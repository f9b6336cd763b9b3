"""Learning-rate schedules: warmup, cosine, WSD, constant."""

from __future__ import annotations

import math

import pytest
import torch

from llm.config.defaults import TrainConfig
from llm.training.schedule import LRSchedule, apply_lr, build_schedule


def test_warmup_is_linear_from_peak_over_warmup():
    s = LRSchedule("constant", 1.0, warmup_steps=4, total_steps=10)
    assert [s.factor(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_reaches_min_ratio_at_last_step_and_is_monotone():
    s = LRSchedule("cosine", 2.0, warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    lrs = [s.lr(i) for i in range(12)]
    assert lrs[1] == 2.0 and math.isclose(lrs[-1], 0.2)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    mid = 2 + (11 - 2) / 2
    assert math.isclose(s.factor(int(mid)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 2) / 9)))


def test_wsd_holds_then_decays_over_the_last_fraction():
    s = LRSchedule("wsd", 1.0, warmup_steps=1, total_steps=10, min_lr_ratio=0.0, decay_fraction=0.3)
    f = [s.factor(i) for i in range(10)]
    assert f[:7] == [1.0] * 7  # stable phase after 1 warmup step
    assert f[7] == 1.0 and math.isclose(f[8], 0.5) and f[9] == 0.0


def test_apply_lr_uses_group_multipliers():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr_multiplier": 4.0}], lr=1.0)
    apply_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 2.0]


def test_build_from_config_and_bad_kind():
    tc = TrainConfig(lr=0.1, warmup_steps=0, lr_schedule="cosine", min_lr_ratio=0.0)
    s = build_schedule(tc, 5)
    assert s.lr(0) == 0.1 and s.lr(4) == 0.0
    assert s.state_dict()["total_steps"] == 5
    with pytest.raises(ValueError, match="lr_schedule"):
        LRSchedule("linear", 1.0, 0, 5)
