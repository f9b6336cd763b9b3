"""Expert-usage statistics: pure functions of a selection-count tensor.

``counts`` is (N,): one head's counts, or the heads' summed (sum an (H, N) tally over dim 0 first), N = prod(product_key_dim),
expert ids row-major over the product-key grid (GUIDE §2). The tracker logs these during training;
``scripts/analyze_model.py`` uses them too.

- usage fraction: experts selected at least once / N;
- KL from uniform: KL(p || U) = sum_i p_i log(p_i N), in nats; 0 = perfectly even, log N = one expert
  takes everything (the PEER paper reports 1.06 with BatchNorm queries at N = 1024^2);
- dead sub-keys: entries of sub-key set p whose every expert went unselected; a dead sub-key kills a
  whole row (or slab) of the grid, which is how dead experts appear in PEER;
- hottest experts: the ids with the most selections and their share of all selections.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_BINS = 512  # W&B's histogram limit


def usage_fraction(counts: torch.Tensor) -> float:
    """Fraction of experts selected at least once; counts (N,)."""
    return float((counts > 0).float().mean())


def kl_from_uniform(counts: torch.Tensor) -> float:
    """KL(p || uniform) in nats of the selection distribution p = counts / sum; NaN when nothing was selected."""
    c = counts.double().reshape(-1)
    total = c.sum()
    if total <= 0:
        return math.nan
    p = c[c > 0] / total
    return float((p * (p * c.numel()).log()).sum())


def subkey_counts(counts: torch.Tensor, product_key_dim: list[int]) -> list[torch.Tensor]:
    """Selections per sub-key of each part: P tensors (n_p,), summing the grid over the other axes."""
    grid = counts.reshape(*product_key_dim)
    dims = range(len(product_key_dim))
    return [grid.sum(dim=[d for d in dims if d != p]) if len(product_key_dim) > 1 else grid for p in dims]


def dead_subkeys(counts: torch.Tensor, product_key_dim: list[int]) -> list[int]:
    """Per part, how many sub-keys were never part of a selected expert."""
    return [int((c == 0).sum()) for c in subkey_counts(counts, product_key_dim)]


def hottest(counts: torch.Tensor, k: int = 5) -> tuple[list[int], list[float]]:
    """The k most selected expert ids and each one's share of all selections; counts (N,)."""
    if counts.dim() != 1:
        raise ValueError(f"expert usage counts must be one (N,) vector; got shape {tuple(counts.shape)} (sum over heads first)")
    c = counts
    total = float(c.sum())
    values, ids = torch.topk(c, min(k, c.numel()))
    shares = [float(v) / total if total > 0 else 0.0 for v in values]
    return ids.tolist(), shares


def subkey_grid(counts: torch.Tensor, product_key_dim: list[int]) -> torch.Tensor:
    """(n_0, n_1) selection counts over a 2-D product-key grid (for heatmaps)."""
    if len(product_key_dim) != 2:
        raise ValueError(f"product_key_dim: {product_key_dim} is not 2-D; a grid heatmap needs two parts")
    return counts.reshape(*product_key_dim)


def count_histogram(counts: torch.Tensor, max_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of per-expert selection counts: (hist (n,), edges (n + 1,)), n <= 512.

    Counts are integers, so with a small maximum every value gets its own bin; otherwise the range
    is split evenly into ``max_bins``.
    """
    c = counts.reshape(-1).double().cpu().numpy()
    max_bins = min(max_bins, MAX_BINS)
    top = int(c.max()) if c.size else 0
    if top + 1 <= max_bins:
        return np.histogram(c, bins=np.arange(top + 2) - 0.5)  # one bin per integer count
    return np.histogram(c, bins=max_bins)


def summarize(counts: torch.Tensor, product_key_dim: list[int], top: int = 5) -> dict[str, float | str]:
    """Scalar statistics of one (N,) count vector, keyed by metric name."""
    if counts.dim() != 1:
        raise ValueError(f"expert usage counts must be one (N,) vector; got shape {tuple(counts.shape)} (sum over heads first)")
    ids, shares = hottest(counts, top)
    out: dict[str, float | str] = {
        "selections": float(counts.sum()),
        "usage_fraction": usage_fraction(counts),
        "kl_uniform": kl_from_uniform(counts),
        f"top{top}_share": float(sum(shares)),
        "top1_share": shares[0] if shares else 0.0,
        "hottest": ",".join(f"{i}:{s:.4f}" for i, s in zip(ids, shares, strict=True)),
    }
    for p, dead in enumerate(dead_subkeys(counts, product_key_dim)):
        out[f"dead_subkeys_p{p}"] = float(dead)
    return out
