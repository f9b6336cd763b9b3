"""Weights of one MLA layer to and from Hugging Face ``DeepseekV3Attention`` (transformers) names.

Names: wq -> q_proj; wq_a -> q_a_proj; q_norm -> q_a_layernorm; wq_b -> q_b_proj;
wkv_a -> kv_a_proj_with_mqa; kv_norm -> kv_a_layernorm; wkv_b -> kv_b_proj; wo -> o_proj.

Rope layout: our rope dims are half-rotated (``rope.py``); HF with ``rope_interleave: true`` (its default,
and DeepSeek's checkpoints) pairs adjacent dims. Exporting permutes the rope rows of the query projection
(each head's last R rows) and of ``wkv_a`` (its last R rows) so that our pair (i, R/2 + i) lands on HF's
(2i, 2i + 1); importing inverts it. With ``rope_interleave=False`` HF also half-rotates: names only.

Keys carry no layer prefix: the caller adds or strips ``model.layers.{i}.self_attn.`` (whole-model export).
"""

from __future__ import annotations

import torch

from llm.config.defaults import MLAConfig

_OURS_TO_HF = {
    "wq.weight": "q_proj.weight",
    "wq_a.weight": "q_a_proj.weight",
    "q_norm.weight": "q_a_layernorm.weight",
    "wq_b.weight": "q_b_proj.weight",
    "wkv_a.weight": "kv_a_proj_with_mqa.weight",
    "kv_norm.weight": "kv_a_layernorm.weight",
    "wkv_b.weight": "kv_b_proj.weight",
    "wo.weight": "o_proj.weight",
}
_HF_TO_OURS = {v: k for k, v in _OURS_TO_HF.items()}


def _half_to_interleaved(rope_dim: int) -> torch.Tensor:
    """Index i such that interleaved[j] = half[i[j]]: (x_0, y_0, x_1, y_1, ...) from (x_0.. | y_0..)."""
    half = rope_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # (R,)


def _permute_rope_rows(w: torch.Tensor, config: MLAConfig, per_head: bool, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the rope rows of a projection weight (rows, in) with `perm`; other rows unchanged."""
    r = config.qk_rope_head_dim
    if per_head:
        w3 = w.view(config.num_heads, config.qk_nope_head_dim + r, -1)  # (H, N + R, in)
        rope = w3[:, config.qk_nope_head_dim :][:, perm]
        return torch.cat([w3[:, : config.qk_nope_head_dim], rope], dim=1).reshape(w.shape)
    return torch.cat([w[: w.shape[0] - r], w[w.shape[0] - r :][perm]], dim=0)


def _convert(sd: dict[str, torch.Tensor], config: MLAConfig, names: dict[str, str], perm: torch.Tensor | None):
    out = {}
    for key, value in sd.items():
        if key not in names:
            raise KeyError(f"unexpected MLA weight {key!r}; expected some of {sorted(names)}")
        new = names[key]
        if perm is not None and new in ("wq.weight", "wq_b.weight", "q_proj.weight", "q_b_proj.weight"):
            value = _permute_rope_rows(value, config, per_head=True, perm=perm)
        elif perm is not None and new in ("wkv_a.weight", "kv_a_proj_with_mqa.weight"):
            value = _permute_rope_rows(value, config, per_head=False, perm=perm)
        out[new] = value
    return out


def mla_state_dict_to_hf(
    sd: dict[str, torch.Tensor], config: MLAConfig, rope_interleave: bool = True
) -> dict[str, torch.Tensor]:
    """Our layer's state dict (unprefixed) -> HF ``DeepseekV3Attention`` state dict (unprefixed)."""
    perm = _half_to_interleaved(config.qk_rope_head_dim) if rope_interleave else None
    return _convert(sd, config, _OURS_TO_HF, perm)


def mla_state_dict_from_hf(
    sd: dict[str, torch.Tensor], config: MLAConfig, rope_interleave: bool = True
) -> dict[str, torch.Tensor]:
    """HF ``DeepseekV3Attention`` state dict (unprefixed) -> ours (unprefixed); inverse of the export."""
    perm = torch.argsort(_half_to_interleaved(config.qk_rope_head_dim)) if rope_interleave else None
    return _convert(sd, config, _HF_TO_OURS, perm)
