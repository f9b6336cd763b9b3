"""Cross-field rules: every impossible combination raises ``ConfigError`` naming the dotted key.

Type checking happens while loading (``loader.py``); this module checks ranges, choices and
relations between fields. Modules that take a config section directly (``PEER(dim, cfg)``) call
the section's validator too, so a config built in Python gets the same messages as a YAML one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from llm.config.defaults import (
    AblationConfig,
    Config,
    DatasetConfig,
    DataSourceConfig,
    EvalConfig,
    MLAConfig,
    ModelConfig,
    PEERConfig,
    TrainConfig,
    WandbConfig,
)
from llm.config.errors import ConfigError


def validate_config(config: Config) -> None:
    require_finite(config, "")
    validate_model_config(config.model_config, "model_config")
    validate_train_config(config.train_config, "train_config")
    validate_dataset_config(config.dataset_config, "dataset_config")
    validate_eval_config(config.eval_config, "eval_config")
    validate_wandb_config(config.wandb_config, "wandb_config")
    validate_ablation_config(config.ablation_config, "ablation_config")
    seq_len = config.dataset_config.seq_len
    if seq_len > config.model_config.max_seq_len:
        raise ConfigError(
            f"dataset_config.seq_len: {seq_len} exceeds model_config.max_seq_len={config.model_config.max_seq_len}"
        )


# Columns of an ablation study's results.csv besides the axes (llm/training/ablation_report.py).
REPORT_COLUMNS = frozenset({
    "rank", "run", "status", "val_loss", "val_perplexity", "val_step", "train_loss", "steps", "tokens",
    "tokens_per_s", "params_total", "params_active", "wall_s", "error",
})  # fmt: skip
# Seeds: torch and numpy take any 64-bit value; the trainer adds the rank, so leave room below 2**63.
MAX_SEED = 2**62


def require_finite(value: Any, key: str) -> None:
    """Every float in a config value (sections, lists and mappings included) is finite: the range checks
    below compare with bounds, which NaN fails but +-inf can pass (``lr: .inf``). ``key`` names value."""
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            require_finite(getattr(value, field.name), f"{key}.{field.name}" if key else field.name)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            require_finite(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            require_finite(item, f"{key}.{name}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: got {value!r}; must be a finite number")


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError("key: got value; allowed")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key}: got {value!r}; {allowed}")


def require_choice(value: Any, key: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    require(value in choices, key, value, f"allowed: {' | '.join(choices)}")


def validate_peer_config(cfg: PEERConfig, prefix: str = "peer_config") -> None:
    k = f"{prefix}."
    require(cfg.num_experts >= 1, k + "num_experts", cfg.num_experts, "must be >= 1")
    dims = cfg.product_key_dim
    require(len(dims) >= 1, k + "product_key_dim", dims, "must list at least one sub-key set size")
    require(all(d >= 1 for d in dims), k + "product_key_dim", dims, "every size must be >= 1")
    require(
        math.prod(dims) == cfg.num_experts,
        k + "product_key_dim",
        dims,
        f"its product ({math.prod(dims)}) must equal num_experts={cfg.num_experts}",
    )
    require(
        1 <= cfg.num_experts_per_tok <= cfg.num_experts,
        k + "num_experts_per_tok",
        cfg.num_experts_per_tok,
        f"must be in [1, num_experts={cfg.num_experts}]",
    )
    require(cfg.num_heads >= 1, k + "num_heads", cfg.num_heads, "must be >= 1")
    require(cfg.expert_hidden_size >= 1, k + "expert_hidden_size", cfg.expert_hidden_size, "must be >= 1")
    require(
        cfg.query_dim >= len(dims) and cfg.query_dim % len(dims) == 0,
        k + "query_dim",
        cfg.query_dim,
        f"must be a positive multiple of len(product_key_dim)={len(dims)}",
    )
    require_choice(cfg.query_norm, k + "query_norm", ["batchnorm", "layernorm", "none"])
    require_choice(cfg.score_fn, k + "score_fn", ["softmax", "sigmoid"])
    require_choice(cfg.activation, k + "activation", ["gelu", "relu", "silu"])
    require(0.0 <= cfg.dropout < 1.0, k + "dropout", cfg.dropout, "must be in [0, 1)")
    require(cfg.table_lr_multiplier > 0, k + "table_lr_multiplier", cfg.table_lr_multiplier, "must be > 0")
    require(cfg.table_weight_decay >= 0, k + "table_weight_decay", cfg.table_weight_decay, "must be >= 0")
    require_choice(cfg.table_optimizer, k + "table_optimizer", ["adamw", "sparse_adam"])
    require_choice(cfg.table_moment_dtype, k + "table_moment_dtype", ["float32", "bfloat16"])
    require_choice(cfg.kernel, k + "kernel", ["auto", "triton", "torch"])
    require(cfg.max_gather_mib >= 1, k + "max_gather_mib", cfg.max_gather_mib, "must be >= 1")
    require(cfg.log_freq >= 1, k + "log_freq", cfg.log_freq, "must be >= 1")


def validate_mla_config(cfg: MLAConfig, prefix: str = "mla_config") -> None:
    k = f"{prefix}."
    require(cfg.num_heads >= 1, k + "num_heads", cfg.num_heads, "must be >= 1")
    require(cfg.q_lora_rank >= 0, k + "q_lora_rank", cfg.q_lora_rank, "must be >= 0 (0 = no query compression)")
    require(cfg.kv_lora_rank >= 1, k + "kv_lora_rank", cfg.kv_lora_rank, "must be >= 1")
    require(cfg.qk_nope_head_dim >= 0, k + "qk_nope_head_dim", cfg.qk_nope_head_dim, "must be >= 0")
    require(
        cfg.qk_rope_head_dim >= 2 and cfg.qk_rope_head_dim % 2 == 0,
        k + "qk_rope_head_dim",
        cfg.qk_rope_head_dim,
        "must be even and >= 2 (rotary pairs)",
    )
    require(cfg.v_head_dim >= 1, k + "v_head_dim", cfg.v_head_dim, "must be >= 1")
    # theta <= 1 gives non-decreasing wavelengths (and log(theta) = 0 divides YaRN's ramp by zero)
    require(cfg.rope_theta > 1, k + "rope_theta", cfg.rope_theta, "must be > 1 (e.g. 10000)")
    y = cfg.yarn
    require(y.factor >= 1.0, k + "yarn.factor", y.factor, "must be >= 1.0 (1.0 = YaRN off)")
    require(
        y.original_max_position_embeddings >= 1,
        k + "yarn.original_max_position_embeddings",
        y.original_max_position_embeddings,
        "must be >= 1",
    )
    require(y.beta_fast > y.beta_slow > 0, k + "yarn.beta_fast", y.beta_fast, f"must exceed beta_slow={y.beta_slow} > 0")
    require(y.mscale_all_dim >= 0, k + "yarn.mscale_all_dim", y.mscale_all_dim, "must be >= 0")
    require_choice(cfg.attention_backend, k + "attention_backend", ["auto", "cudnn", "flash", "efficient", "flex", "math"])
    require_choice(cfg.decode_backend, k + "decode_backend", ["auto", "flash_mla", "triton", "torch"])


def validate_model_config(cfg: ModelConfig, prefix: str = "model_config") -> None:
    k = f"{prefix}."
    require(cfg.vocab_size >= 2, k + "vocab_size", cfg.vocab_size, "must be >= 2")
    require(cfg.dim >= 1, k + "dim", cfg.dim, "must be >= 1")
    require(cfg.num_layers >= 1, k + "num_layers", cfg.num_layers, "must be >= 1")
    require(cfg.max_seq_len >= 2, k + "max_seq_len", cfg.max_seq_len, "must be >= 2")
    require(cfg.ffn_hidden_size >= 1, k + "ffn_hidden_size", cfg.ffn_hidden_size, "must be >= 1")
    require(
        0 <= cfg.first_k_dense <= cfg.num_layers,
        k + "first_k_dense",
        cfg.first_k_dense,
        f"must be in [0, num_layers={cfg.num_layers}]",
    )
    require(cfg.peer_every_n >= 0, k + "peer_every_n", cfg.peer_every_n, "must be >= 0 (0 = no PEER layers)")
    if cfg.peer_layers is not None:
        bad = [i for i in cfg.peer_layers if not 0 <= i < cfg.num_layers]
        require(not bad, k + "peer_layers", cfg.peer_layers, f"indices must be in [0, num_layers={cfg.num_layers})")
        require(
            len(set(cfg.peer_layers)) == len(cfg.peer_layers), k + "peer_layers", cfg.peer_layers, "has duplicates"
        )
    require(cfg.norm_eps > 0, k + "norm_eps", cfg.norm_eps, "must be > 0")
    require(cfg.init_std > 0, k + "init_std", cfg.init_std, "must be > 0")
    require(cfg.z_loss >= 0, k + "z_loss", cfg.z_loss, "must be >= 0")
    require(cfg.loss_chunk_tokens >= 0, k + "loss_chunk_tokens", cfg.loss_chunk_tokens, "must be >= 0 (0 = off)")
    validate_peer_config(cfg.peer_config, k + "peer_config")
    validate_mla_config(cfg.mla_config, k + "mla_config")


def validate_train_config(cfg: TrainConfig, prefix: str = "train_config") -> None:
    k = f"{prefix}."
    require(bool(cfg.output_dir.strip()), k + "output_dir", cfg.output_dir, "must be a directory path")
    require(cfg.max_steps >= 1, k + "max_steps", cfg.max_steps, "must be >= 1")
    require(cfg.max_tokens >= 0, k + "max_tokens", cfg.max_tokens, "must be >= 0 (0 = use max_steps)")
    require(cfg.batch_size >= 1, k + "batch_size", cfg.batch_size, "must be >= 1")
    require(cfg.grad_accum_steps >= 1, k + "grad_accum_steps", cfg.grad_accum_steps, "must be >= 1")
    require(cfg.lr > 0, k + "lr", cfg.lr, "must be > 0")
    require(0 <= cfg.min_lr_ratio <= 1, k + "min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
    require_choice(cfg.lr_schedule, k + "lr_schedule", ["cosine", "wsd", "constant"])
    require(cfg.warmup_steps >= 0, k + "warmup_steps", cfg.warmup_steps, "must be >= 0")
    require(0 < cfg.decay_fraction <= 1, k + "decay_fraction", cfg.decay_fraction, "must be in (0, 1]")
    require(cfg.weight_decay >= 0, k + "weight_decay", cfg.weight_decay, "must be >= 0")
    require(0 <= cfg.beta1 < 1, k + "beta1", cfg.beta1, "must be in [0, 1)")
    require(0 <= cfg.beta2 < 1, k + "beta2", cfg.beta2, "must be in [0, 1)")
    require(cfg.eps > 0, k + "eps", cfg.eps, "must be > 0")
    require(cfg.grad_clip >= 0, k + "grad_clip", cfg.grad_clip, "must be >= 0 (0 = off)")
    require_choice(cfg.precision, k + "precision", ["auto", "bf16", "fp32"])
    require_choice(cfg.distributed, k + "distributed", ["ddp", "fsdp"])
    require_choice(cfg.device, k + "device", ["auto", "cpu", "cuda"])
    require(cfg.checkpoint_interval >= 0, k + "checkpoint_interval", cfg.checkpoint_interval, "must be >= 0")
    require(cfg.keep_last_checkpoints >= 1, k + "keep_last_checkpoints", cfg.keep_last_checkpoints, "must be >= 1")
    require(cfg.keep_every_n_steps >= 0, k + "keep_every_n_steps", cfg.keep_every_n_steps, "must be >= 0")
    require(cfg.log_interval >= 1, k + "log_interval", cfg.log_interval, "must be >= 1")
    require(0 <= cfg.seed < MAX_SEED, k + "seed", cfg.seed, f"must be in [0, {MAX_SEED})")
    require(
        cfg.max_consecutive_nonfinite >= 1, k + "max_consecutive_nonfinite", cfg.max_consecutive_nonfinite, "must be >= 1"
    )


def validate_dataset_config(cfg: DatasetConfig, prefix: str = "dataset_config") -> None:
    k = f"{prefix}."
    require(cfg.seq_len >= 2, k + "seq_len", cfg.seq_len, "must be >= 2")
    require(0 <= cfg.seed < MAX_SEED, k + "seed", cfg.seed, f"must be in [0, {MAX_SEED})")
    require_choice(cfg.stopping_strategy, k + "stopping_strategy", ["first_exhausted", "all_exhausted"])
    require(cfg.shuffle_buffer >= 0, k + "shuffle_buffer", cfg.shuffle_buffer, "must be >= 0")
    require(cfg.num_workers >= 0, k + "num_workers", cfg.num_workers, "must be >= 0")
    require(cfg.prefetch_factor >= 1, k + "prefetch_factor", cfg.prefetch_factor, "must be >= 1")
    require(cfg.max_bad_records >= 0, k + "max_bad_records", cfg.max_bad_records, "must be >= 0")
    require(bool(cfg.tokenizer.strip()), k + "tokenizer", cfg.tokenizer, "must name a tokenizer ('embedded', a file or a hub name)")
    if not cfg.sources:
        require(bool(cfg.mix.strip()), k + "mix", cfg.mix, "must name a mix in datasets_file when sources is empty")
    for i, src in enumerate(cfg.sources):
        validate_data_source(src, f"{k}sources[{i}]")


def validate_data_source(src: DataSourceConfig, prefix: str) -> None:
    """One source, inline (``dataset_config.sources[i]``) or from a mix of ``datasets_file``."""
    s = f"{prefix}."
    require_choice(src.type, s + "type", ["hub", "local", "embedded"])
    require(src.type == "embedded" or bool(src.path), s + "path", src.path, "must name a hub dataset or local file/glob")
    # a weight of 0 would never be drawn, so an epoch waiting for every source to run out would not end
    require(
        isinstance(src.weight, (int, float)) and src.weight > 0 and math.isfinite(src.weight),
        s + "weight",
        src.weight,
        "must be a finite number > 0 (leave a source out of the mix to drop it)",
    )
    require_choice(src.sample_by, s + "sample_by", ["line", "paragraph", "document"])
    require(src.min_chars >= 0, s + "min_chars", src.min_chars, "must be >= 0")
    require(src.max_chars >= 0, s + "max_chars", src.max_chars, "must be >= 0 (0 = no limit)")
    require(
        src.max_chars == 0 or src.max_chars >= src.min_chars, s + "max_chars", src.max_chars,
        f"must be 0 (no limit) or >= min_chars={src.min_chars} (otherwise every document is dropped)",
    )  # fmt: skip
    require(src.holdout_documents >= 0, s + "holdout_documents", src.holdout_documents, "must be >= 0 (0 = off)")
    require(
        not (src.holdout_documents and src.type == "embedded"), s + "holdout_documents", src.holdout_documents,
        "must be 0 for an embedded source (it has its own validation split)",
    )  # fmt: skip
    require(
        not (src.holdout_documents and src.validation_split),
        s + "holdout_documents",
        src.holdout_documents,
        f"set either it or validation_split ({src.validation_split!r}), not both",
    )


def validate_eval_config(cfg: EvalConfig, prefix: str = "eval_config") -> None:
    k = f"{prefix}."
    require(cfg.eval_interval >= 0, k + "eval_interval", cfg.eval_interval, "must be >= 0 (0 = only at the end)")
    require(cfg.eval_batches >= 1, k + "eval_batches", cfg.eval_batches, "must be >= 1")
    require(cfg.sample_tokens >= 0, k + "sample_tokens", cfg.sample_tokens, "must be >= 0")
    require(cfg.temperature >= 0, k + "temperature", cfg.temperature, "must be >= 0 (0 = greedy)")
    require(cfg.top_k >= 0, k + "top_k", cfg.top_k, "must be >= 0 (0 = off)")
    require(0 < cfg.top_p <= 1, k + "top_p", cfg.top_p, "must be in (0, 1]")


def validate_wandb_config(cfg: WandbConfig, prefix: str = "wandb_config") -> None:
    require_choice(cfg.mode, f"{prefix}.mode", ["auto", "online", "offline", "disabled"])


def validate_ablation_config(cfg: AblationConfig, prefix: str = "ablation_config") -> None:
    from llm.config.loader import dotted_keys  # loader imports this module

    known = set(dotted_keys())
    require(cfg.tokens_per_run >= 0, f"{prefix}.tokens_per_run", cfg.tokens_per_run, "must be >= 0")
    require_choice(cfg.strategy, f"{prefix}.strategy", ["one_at_a_time", "grid"])
    for axis, variants in cfg.axes.items():
        require(
            axis not in REPORT_COLUMNS, f"{prefix}.axes", axis,
            f"an axis may not be named like a column of the study's report ({', '.join(sorted(REPORT_COLUMNS))})",
        )  # fmt: skip
        require(bool(variants), f"{prefix}.axes.{axis}", variants, "must list at least one variant")
        for variant, overrides in variants.items():
            for key in overrides:
                require(
                    key in known,
                    f"{prefix}.axes.{axis}.{variant}",
                    key,
                    "override keys must be dotted config keys such as model_config.peer_config.num_heads",
                )
