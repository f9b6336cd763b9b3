"""Learning-rate schedules: linear warmup, then cosine decay, warmup-stable-decay (WSD), or constant.

A schedule maps an optimiser step to a factor of the peak learning rate; ``apply_lr`` writes
``peak * factor * group["lr_multiplier"]`` into every parameter group (the PEER tables' group carries
its own multiplier). The schedule holds no running state beyond its parameters, so resuming at step
``s`` only needs ``s``; ``state_dict`` exists so the checkpoint records what schedule produced the run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llm.config.defaults import TrainConfig

SCHEDULES = ("cosine", "wsd", "constant")


class LRSchedule:
    """Factor of the peak learning rate at each optimiser step (0-based).

    Args:
        kind: cosine | wsd | constant.
        peak_lr: learning rate reached at the end of warmup.
        warmup_steps: linear ramp from peak/warmup_steps to peak over these steps.
        total_steps: length of the run; cosine and WSD reach ``min_lr_ratio`` at the last step.
        min_lr_ratio: final learning rate as a fraction of the peak.
        decay_fraction: WSD only, the fraction of ``total_steps`` spent decaying (linearly) at the end.
    """

    def __init__(
        self,
        kind: str,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.1,
        decay_fraction: float = 0.2,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"lr_schedule: {kind!r} is not one of {', '.join(SCHEDULES)}")
        if total_steps < 1:
            raise ValueError(f"total_steps: {total_steps} must be >= 1")
        self.kind = kind
        self.peak_lr = float(peak_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.decay_fraction = float(decay_fraction)

    def factor(self, step: int) -> float:
        """Multiplier of ``peak_lr`` for optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            # Start at peak/warmup rather than 0 so the first update is not wasted.
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        last = max(self.total_steps - 1, 1)
        if self.kind == "cosine":
            span = max(last - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        # WSD: hold the peak, then decay linearly over the last `decay_fraction` of the run.
        decay_steps = max(int(round(self.decay_fraction * self.total_steps)), 1)
        decay_start = max(self.total_steps - decay_steps, self.warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(last - decay_start, 1), 1.0)
        return 1.0 - (1 - self.min_lr_ratio) * progress

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "decay_fraction": self.decay_fraction,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The config is the source of truth (a changed max_steps legitimately changes the schedule);
        # the saved values are kept only as a record, so nothing is restored here.
        return None


def build_schedule(train_config: TrainConfig, total_steps: int) -> LRSchedule:
    return LRSchedule(
        train_config.lr_schedule,
        train_config.lr,
        train_config.warmup_steps,
        total_steps,
        train_config.min_lr_ratio,
        train_config.decay_fraction,
    )


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr`` times its ``lr_multiplier`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)
