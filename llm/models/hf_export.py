"""Saving a ``FoundationModel``: the native format (any model) and Hugging Face DeepseekV3 (dense models).

Native (``save_pretrained`` / ``from_pretrained``): ``model.safetensors`` holding the state dict
(a tied LM head is stored once, as the embedding) and ``config.json`` holding the ``model_config``
section plus a format marker. Loading type-checks and validates the config like a YAML one.

Hugging Face (``export_hf``): ``config.json`` with ``model_type: deepseek_v3`` and
``model.safetensors`` under HF's names, so ``transformers.AutoModelForCausalLM.from_pretrained``
loads it and computes the same logits. DeepseekV3 has no PEER layer, so only models whose FFNs
are all dense export; the routed-expert fields are set so HF builds every layer dense
(``first_k_dense_replace = num_layers``). One attention layer's mapping (names, the rope-row
permutation) lives in ``llm/models/hf_mapping.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from llm.config.defaults import ModelConfig, peer_layer_indices
from llm.config.errors import ConfigError
from llm.config.loader import from_dict
from llm.models.rope import cos_sin_scale

FORMAT = "foundation-llm"  # marker in config.json of the native format
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # safetensors refuses views and shared storage: give each tensor its own contiguous CPU copy.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path), metadata)


# ----------------------------------------------------------------------------------------
# Native format
# ----------------------------------------------------------------------------------------


def save_pretrained(model, directory: str | Path) -> Path:
    """Write ``model``'s weights and ``model_config`` to ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("head.weight")  # the same tensor as embed.weight; re-tied on load
    _save_tensors(state, directory / WEIGHTS_NAME, {"format": "pt"})
    _write_json(directory / CONFIG_NAME, {"format": FORMAT, "model_config": dataclasses.asdict(model.config)})
    return directory


def load_native_config(directory: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a directory written by ``save_pretrained``; ``ConfigError`` if it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; expected a directory written by save_pretrained")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT or "model_config" not in data:
        raise ConfigError(f"{path}: not a native {FORMAT} model (format={data.get('format')!r})")
    return from_dict(ModelConfig, data["model_config"], "model_config")


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model saved by ``save_pretrained`` (strict: every weight must be present)."""
    from safetensors.torch import load_file

    from llm.models.foundation import FoundationModel

    directory = Path(directory)
    config = load_native_config(directory)
    with torch.device(map_location):
        model = FoundationModel(config)
    state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    if config.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    return model


# ----------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a complete checkpoint, else the newest intact one of run directory ``path``."""
    from llm.training.checkpoint import find_model_checkpoint

    return find_model_checkpoint(path)


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(resolved ``Config``, ``FoundationModel`` with the checkpoint's weights) of a checkpoint or run directory."""
    from llm.config import load_config
    from llm.models.foundation import FoundationModel
    from llm.training.checkpoint import load_model_weights

    checkpoint = find_checkpoint(path)
    config = load_config(checkpoint / "config.yaml")
    with torch.device(device):
        model = FoundationModel(config.model_config)
    model.load_state_dict(load_model_weights(checkpoint), strict=True)
    return config, model


def export_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "native") -> Path:
    """``scripts/export.py``: write a training checkpoint as ``native`` (any model) or ``hf`` (all-dense models)."""
    if fmt not in ("native", "hf"):
        raise ValueError(f"--format: got {fmt!r}; allowed: native | hf")
    if Path(output).exists() and not Path(output).is_dir():
        raise ValueError(f"--output: {output} is a file; give a directory to write (created if missing)")
    _, model = model_from_checkpoint(checkpoint)
    return save_pretrained(model, output) if fmt == "native" else export_hf(model, output)


# ----------------------------------------------------------------------------------------
# Hugging Face DeepseekV3
# ----------------------------------------------------------------------------------------


def hf_rope_parameters(model_config: ModelConfig) -> dict:
    """HF ``rope_parameters``: plain RoPE, or YaRN with DeepSeek's fields when ``yarn.factor > 1``."""
    m = model_config.mla_config
    if m.yarn.factor <= 1.0:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    y = m.yarn
    return {
        "rope_type": "yarn",
        "rope_theta": m.rope_theta,
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
        # transformers applies the softmax temperature only when mscale_all_dim is set and, without an
        # explicit attention_factor, scales cos/sin by its own default whenever either field is 0; ours
        # (DeepSeek's) falls back to mscale for the temperature. Exporting the coefficients actually used
        # makes both compute the same logits for every (mscale, mscale_all_dim).
        "mscale": y.mscale,
        "mscale_all_dim": y.mscale_all_dim if y.mscale_all_dim > 0 else y.mscale,
        "attention_factor": cos_sin_scale(y),
    }


def _legacy_rope_scaling(rope_parameters: dict) -> dict | None:
    if rope_parameters["rope_type"] == "default":
        return None
    legacy = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return {"type": legacy["rope_type"], **legacy}


def _max_position_embeddings(cfg: ModelConfig) -> int:
    """max_seq_len, or with YaRN factor x original context (as DeepSeek-V3's config: 40 x 4096).

    Some transformers 4.x releases (4.53 among them) derive YaRN's factor from max_position_embeddings /
    original_max_position_embeddings instead of reading ``factor``; the two agree only like this (the
    trained max_seq_len is then not in the export; rope is computed per position, so nothing needs it).
    """
    y = cfg.mla_config.yarn
    if y.factor <= 1.0:
        return cfg.max_seq_len
    return round(y.factor * y.original_max_position_embeddings)


def hf_config(model_config: ModelConfig) -> dict:
    """``config.json`` of the HF DeepseekV3 equivalent of an all-dense ``model_config``."""
    cfg = model_config
    m = cfg.mla_config
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": _max_position_embeddings(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        # Every layer dense: HF builds routed-expert MoE only from first_k_dense_replace on.
        "first_k_dense_replace": cfg.num_layers,
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "n_shared_experts": 1,
        "moe_intermediate_size": cfg.ffn_hidden_size,
        "n_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,  # no multi-token-prediction module
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    config.update(
        {
            "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_heads,
            "q_lora_rank": m.q_lora_rank or None,  # HF: null = one full-rank q_proj (0 in DeepSeek's code)
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim,
            "attention_bias": False,
            "rope_interleave": True,  # DeepSeek's layout; hf_mapping permutes our half-rotated rope rows
            "rope_parameters": hf_rope_parameters(cfg),
            # transformers 4.x names of the same settings (5.x converts them to rope_parameters)
            "rope_theta": m.rope_theta,
            "rope_scaling": _legacy_rope_scaling(hf_rope_parameters(cfg)),
        }
    )
    return config


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s weights under DeepseekV3 names (attention via ``hf_mapping``)."""
    from llm.models.hf_mapping import mla_state_dict_to_hf

    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = block.attn_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        attn = mla_state_dict_to_hf(block.attn.state_dict(), model.config.mla_config, rope_interleave=True)
        for name, tensor in attn.items():
            state[prefix + "self_attn." + name] = tensor
        state[prefix + "mlp.gate_proj.weight"] = block.ffn.w1.weight
        state[prefix + "mlp.up_proj.weight"] = block.ffn.w3.weight
        state[prefix + "mlp.down_proj.weight"] = block.ffn.w2.weight
    return state


def export_hf(model, directory: str | Path) -> Path:
    """Write ``model`` as a Hugging Face DeepseekV3 checkpoint (fp32, safetensors)."""
    peers = peer_layer_indices(model.config)
    if peers:
        raise ValueError(
            f"export_hf: blocks {peers} use PEER, which Hugging Face DeepseekV3 cannot express; "
            "only all-dense models export (use save_pretrained for the native format)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() for k, v in hf_state_dict(model).items()}
    _save_tensors(state, directory / WEIGHTS_NAME, {"format": "pt"})
    _write_json(directory / CONFIG_NAME, hf_config(model.config))
    return directory
