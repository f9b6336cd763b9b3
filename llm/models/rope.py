"""Rotary position embedding on MLA's rope dims, with DeepSeek-V3's YaRN extension.

Layout: *half rotation*. The R rope dims of a head are two halves ``[x_0 .. x_{R/2-1} | y_0 .. y_{R/2-1}]``
and pair ``(x_i, y_i)`` turns by ``position * inv_freq[i]``. DeepSeek's own code and the Hugging Face
checkpoints (``rope_interleave: true``) pair adjacent dims ``(d_{2i}, d_{2i+1})`` instead; the two are the
same model up to a fixed permutation of the rope rows of ``wq``/``wq_b`` and ``wkv_a``, which
``llm/models/hf_mapping.py`` applies. Half rotation needs no strided even/odd views (cheaper kernels).

YaRN (Peng et al. 2023, arXiv 2309.00071; DeepSeek-V3 ``inference/model.py``): frequencies that turn more
than ``beta_fast`` times over the original context keep their value, those below ``beta_slow`` are divided by
``factor``, a linear ramp blends in between. Attention temperature: the softmax scale is multiplied by
``mscale(factor, m)**2`` with ``m = mscale_all_dim`` when > 0 else ``mscale``; when ``mscale_all_dim > 0``
cos/sin are also multiplied by ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (Hugging Face's
rule; both are 1.0 in DeepSeek-V3, where the two codes agree). YaRN is on whenever ``factor > 1``.

Shapes: T tokens, H heads, R rope dims.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llm.config.defaults import MLAConfig, YarnConfig


def yarn_mscale(factor: float, m: float) -> float:
    """YaRN attention-temperature factor ``0.1 * m * ln(factor) + 1`` (1.0 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * m * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, theta: float, context: int) -> float:
    # Index of the frequency pair that completes `num_rotations` turns over `context` tokens.
    return dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_inv_freq(dim: int, theta: float, yarn: YarnConfig) -> torch.Tensor:
    """Inverse frequencies (dim/2,) fp32 of RoPE on `dim` dims, YaRN-interpolated when yarn.factor > 1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (R/2,)
    if yarn.factor <= 1.0:
        return inv_freq
    ctx = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, theta, ctx)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, theta, ctx)), dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (R/2,)
    # ramp 0 (fast-turning, low index): keep the frequency; ramp 1: interpolate by `factor`.
    return inv_freq / yarn.factor * ramp + inv_freq * (1 - ramp)


def softmax_scale(config: MLAConfig) -> float:
    """(qk_nope_head_dim + qk_rope_head_dim)^-0.5, times the YaRN temperature mscale^2."""
    y = config.yarn
    base = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    m = y.mscale_all_dim if y.mscale_all_dim > 0 else y.mscale
    return base * yarn_mscale(y.factor, m) ** 2


def cos_sin_scale(yarn: YarnConfig) -> float:
    """Multiplier of cos/sin (1.0 unless mscale_all_dim > 0 and mscale != mscale_all_dim)."""
    if yarn.mscale_all_dim <= 0:
        return 1.0
    return yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)


class RotaryEmbedding(nn.Module):
    """cos/sin of the rope dims at given positions (computed on the fly: T*R/2 values, cheaper than a gather)."""

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        self.dim = config.qk_rope_head_dim
        self.scale = cos_sin_scale(config.yarn)
        self.register_buffer("inv_freq", rope_inv_freq(self.dim, config.rope_theta, config.yarn), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) int -> cos, sin each (T, R/2) or (B, T, R/2), fp32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., T, R/2)
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half rotation of x's last dim, computed in fp32, returned in x's dtype.

    x (B, T, R) or (B, T, H, R); cos/sin (T, R/2) or (B, T, R/2).
    """
    if x.dim() == 4:  # broadcast over heads
        cos, sin = cos[..., None, :], sin[..., None, :]
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., R/2) each
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
