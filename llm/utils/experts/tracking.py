"""Expert-usage tracking: read and reset each PEER layer's ``usage_counts`` every ``log_freq`` steps.

The PEER layer itself counts selections into its non-persistent (H, N) int64 buffer, on device and
without a host sync, in training forwards only (not in eval, not when activation checkpointing
re-runs a forward). Here, every ``log_freq`` steps, the buffers are summed over ranks, turned into
the statistics of ``llm/utils/experts/metrics.py`` per layer and per head, a histogram of per-expert
counts (binned to <= 512 bins for W&B) and, for 2-D product keys, a heatmap PNG over the sub-key grid
(written under ``<output_dir>/expert_usage/`` and logged as an image), then zeroed.

With ``log_expert_usage: false`` the layers have no buffer and ``ExpertUsageTracker.enabled`` is
False: the trainer never calls into this module, so tracking costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm.training.metrics import Histogram, Image
from llm.utils.experts import metrics as M

log = logging.getLogger(__name__)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ExpertUsageTracker:
    """Turns the PEER layers' selection counts into logged metrics.

    Args:
        peers: (block index, PEER layer) pairs, e.g. ``FoundationModel.peer_modules()``.
        product_key_dim: sub-key set sizes (same for every layer).
        log_freq: steps between reports.
        image_dir: folder for heatmap PNGs (None = no images).
        reduce: sums a tensor over ranks (``distributed.all_reduce_sum``); identity when single-process.
        top: how many hottest experts to report.
    """

    def __init__(
        self,
        peers: list[tuple[int, nn.Module]],
        product_key_dim: list[int],
        log_freq: int,
        image_dir: str | Path | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
        top: int = 5,
    ) -> None:
        self.peers = [(i, p) for i, p in peers if getattr(p, "usage_counts", None) is not None]
        self.product_key_dim = list(product_key_dim)
        self.log_freq = log_freq
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.reduce = reduce
        self.top = top

    @property
    def enabled(self) -> bool:
        return bool(self.peers)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.log_freq == 0

    def collect(self, step: int, write_images: bool = True) -> dict[str, Any]:
        """Metrics of the selections since the last call, then reset the counters (a collective)."""
        out: dict[str, Any] = {}
        for layer, peer in self.peers:
            counts_HN = self.reduce(peer.usage_counts).cpu().clone()  # (H, N), before the reset below
            peer.usage_counts.zero_()
            prefix = f"experts/layer{layer}"
            merged_N = counts_HN.sum(dim=0)
            out.update({f"{prefix}/{k}": v for k, v in M.summarize(merged_N, self.product_key_dim, self.top).items()})
            for h in range(counts_HN.shape[0]):
                stats = M.summarize(counts_HN[h], self.product_key_dim, self.top)
                for key in ("usage_fraction", "kl_uniform", "top1_share"):
                    out[f"{prefix}/head{h}/{key}"] = stats[key]
            out[f"{prefix}/count_hist"] = Histogram(*M.count_histogram(merged_N))
            if write_images and self.image_dir is not None and len(self.product_key_dim) == 2:
                png = self._heatmap(M.subkey_grid(merged_N, self.product_key_dim), layer, step)
                if png is not None:
                    out[f"{prefix}/heatmap"] = Image(str(png), caption=f"layer {layer}, steps up to {step}")
        return out

    def _heatmap(self, grid: torch.Tensor, layer: int, step: int) -> Path | None:
        try:
            import matplotlib
        except ImportError:
            if self.image_dir is not None:
                log.warning("matplotlib is not installed: expert-usage heatmaps are skipped (metrics still logged)")
            self.image_dir = None  # warn once
            return None

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt

        self.image_dir.mkdir(parents=True, exist_ok=True)
        path = self.image_dir / f"layer{layer:02d}_step{step:08d}.png"
        fig, ax = plt.subplots(figsize=(5, 4.2), dpi=100)
        # log1p: a few hot experts would otherwise wash out the rest of the grid.
        im = ax.imshow(torch.log1p(grid.double()).numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel("sub-key (part 1)")
        ax.set_ylabel("sub-key (part 0)")
        ax.set_title(f"expert selections, layer {layer}, step {step} (log1p)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counts accumulated since the last report (this rank's), so a resumed run reports the same."""
        return {f"layer{i}": p.usage_counts.detach().cpu().clone() for i, p in self.peers}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, p in self.peers:
            if f"layer{i}" in state:
                p.usage_counts.copy_(state[f"layer{i}"])
