"""Typed configuration: every default of the framework lives here, and only here.

A YAML file overrides these values; it never introduces new keys (an unknown key is an
error naming its dotted path). Each dataclass is one concept; each field has a one-line
comment with its unit and meaning. Cross-field rules live in ``llm/config/validation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


@dataclass
class PEERConfig:
    """Parameter Efficient Expert Retrieval (He 2024, arXiv 2407.04153)."""

    num_experts: int = 1_048_576  # N, total experts; must equal prod(product_key_dim)
    product_key_dim: list[int] = field(default_factory=lambda: [1024, 1024])  # sub-key set sizes, one per query part
    num_experts_per_tok: int = 16  # k, experts retrieved per token per head
    num_heads: int = 8  # h, retrieval heads sharing the expert pool; their outputs are summed
    expert_hidden_size: int = 1  # m, hidden units per expert (1 = the paper's single-neuron experts)
    query_dim: int = 128  # d_key, query width per head; split evenly across len(product_key_dim) parts
    # Query normalisation. "batchnorm" is the paper's choice but its batch statistics mix positions of a
    # causal model (a small look-ahead leak) and differ between train and eval; "layernorm" has neither.
    query_norm: str = "layernorm"  # batchnorm | layernorm | none
    score_fn: str = "softmax"  # softmax over each head's k scores | sigmoid per score
    activation: str = "gelu"  # gelu | relu | silu, applied to u_i^T x
    glu: bool = False  # gated experts: act(u_i^T x) * (g_i^T x) with a third table g
    shared_subkeys: bool = True  # one sub-key set shared by all heads (paper) or one per head
    dropout: float = 0.0  # dropout on the layer output
    table_lr_multiplier: float = 1.0  # learning-rate multiplier for the expert tables (public code uses 4-10)
    table_weight_decay: float = 0.0  # weight decay of the expert tables (dense layers' decay does not apply)
    table_optimizer: str = "adamw"  # adamw (dense update) | sparse_adam (row-sparse lazy update)
    # sparse_adam's moments: float32, or bfloat16 (half the optimiser state and its traffic; 5.7 vs 8.1 ms
    # per step at 1M x 1024 on an H100, benchmarks/RESULTS.md)
    table_moment_dtype: str = "float32"
    kernel: str = "auto"  # auto (Triton on CUDA, torch elsewhere) | triton | torch
    max_gather_mib: int = 256  # torch path: bound on one chunk's gathered (tokens, h, k, d) tensor, MiB
    log_expert_usage: bool = False  # count selections per expert (for tracking and W&B histograms)
    log_freq: int = 1000  # steps between expert-usage reports


@dataclass
class YarnConfig:
    """YaRN RoPE extension (DeepSeek-V3 ``rope_scaling``); ``factor: 1.0`` turns it off."""

    factor: float = 1.0  # context extension factor (1.0 = plain RoPE)
    original_max_position_embeddings: int = 4096  # context length the model was trained at, tokens
    beta_fast: float = 32.0  # high-frequency boundary of the interpolation ramp, rotations
    beta_slow: float = 1.0  # low-frequency boundary of the interpolation ramp, rotations
    mscale: float = 1.0  # attention-temperature coefficient m in 0.1*m*ln(factor)+1; softmax scale x mscale(factor, m)^2
    # when > 0 (DeepSeek-V3: 1.0), the softmax uses this coefficient instead and cos/sin are scaled by
    # mscale(factor, mscale)/mscale(factor, this) (Hugging Face's rule; llm/models/rope.py)
    mscale_all_dim: float = 0.0


@dataclass
class MLAConfig:
    """DeepSeek-V2/V3 Multi-head Latent Attention."""

    num_heads: int = 16  # attention heads
    q_lora_rank: int = 0  # rank of the query compression (0 = a single full-rank wq)
    kv_lora_rank: int = 512  # rank of the compressed latent KV (cached per token)
    qk_nope_head_dim: int = 128  # per-head query/key width without rotary embedding
    qk_rope_head_dim: int = 64  # per-head query/key width with rotary embedding (k_pe shared by heads)
    v_head_dim: int = 128  # per-head value width
    rope_theta: float = 10000.0  # RoPE base
    yarn: YarnConfig = field(default_factory=YarnConfig)
    attention_backend: str = "auto"  # auto | cudnn | flash | efficient | flex | math (training/prefill)
    decode_backend: str = "auto"  # auto | flash_mla | triton | torch (absorbed decode over the latent cache)
    document_masking: bool = False  # mask attention across document boundaries of packed sequences


@dataclass
class ModelConfig:
    """The decoder: embeddings, blocks of MLA + (dense SwiGLU | PEER) FFN, final norm, LM head."""

    vocab_size: int = 32_000  # token ids in [0, vocab_size); must cover the tokenizer
    dim: int = 768  # residual stream width
    num_layers: int = 12  # transformer blocks
    max_seq_len: int = 2048  # longest sequence (RoPE tables, KV cache), tokens
    ffn_hidden_size: int = 2048  # hidden width of dense SwiGLU FFNs
    # Which blocks use PEER: the first `first_k_dense` are dense, then every `peer_every_n`-th is PEER;
    # `peer_layers`, when set, lists the PEER block indices explicitly and overrides both.
    first_k_dense: int = 0  # leading dense blocks
    peer_every_n: int = 1  # period of PEER blocks after the leading dense ones (0 = no PEER)
    peer_layers: list[int] | None = None  # explicit PEER block indices (overrides the two above)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding with the LM head
    init_std: float = 0.02  # std of linear/embedding initialisation (residual outputs scaled by 1/sqrt(2L))
    z_loss: float = 0.0  # weight of the log-partition (z) loss, 0 = off
    # Compute LM head + loss over this many tokens at a time, recomputing each chunk's logits in backward:
    # the (tokens, vocab) fp32 logits never exist whole (6.6 GB at 16 x 2048 tokens x 50k vocab), for one
    # extra head matmul. 0 = all tokens at once.
    loss_chunk_tokens: int = 0
    peer_config: PEERConfig = field(default_factory=PEERConfig)
    mla_config: MLAConfig = field(default_factory=MLAConfig)


def peer_layer_indices(model_config: ModelConfig) -> list[int]:
    """Sorted indices of the blocks whose FFN is PEER (the rest are dense SwiGLU).

    ``peer_layers`` when set; otherwise blocks ``first_k_dense, first_k_dense + n, ...`` for
    ``n = peer_every_n`` (none when ``n == 0``). The model and the size report both use this.
    """
    if model_config.peer_layers is not None:
        return sorted(model_config.peer_layers)
    n = model_config.peer_every_n
    if n == 0:
        return []
    return list(range(model_config.first_k_dense, model_config.num_layers, n))


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The optimisation loop, checkpoints and run directory."""

    output_dir: str = "runs/default"  # run directory: resolved config, checkpoints, metrics.jsonl
    max_steps: int = 1000  # optimiser steps to run (ignored when max_tokens > 0)
    max_tokens: int = 0  # stop after this many training tokens (0 = use max_steps)
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum_steps: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (cosine, wsd)
    lr_schedule: str = "cosine"  # cosine | wsd | constant (all after linear warmup)
    warmup_steps: int = 100  # linear warmup length, steps
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying
    weight_decay: float = 0.1  # AdamW decoupled decay of matrices (never norms, biases or embeddings' gains)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute block activations in backward
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard) when launched by torchrun
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_interval: int = 1000  # steps between checkpoints (0 = only at the end and on signals)
    keep_last_checkpoints: int = 3  # rolling checkpoints kept
    keep_every_n_steps: int = 0  # also keep every checkpoint whose step is a multiple of this (0 = none)
    log_interval: int = 10  # steps between metric lines / metrics.jsonl records
    seed: int = 1337  # seed of model init, data order and dropout
    max_consecutive_nonfinite: int = 5  # stop after this many consecutive NaN/inf losses (each is skipped)


@dataclass
class DataSourceConfig:
    """One source of text in a mix."""

    name: str = ""  # label used in logs and per-source token counts
    type: str = "hub"  # hub | local | embedded
    path: str = ""  # hub dataset name, or local file / glob (jsonl, json, txt, parquet)
    config_name: str | None = None  # hub dataset configuration
    split: str = "train"  # training split
    validation_split: str | None = None  # held-out split for evaluation (None = none)
    # Hold out the first N documents of the training split for evaluation, and never train on them:
    # for sources without a validation split (most pretraining corpora on the hub). 0 = off.
    holdout_documents: int = 0
    revision: str | None = None  # hub revision (commit, tag or branch)
    streaming: bool = True  # stream from the hub instead of downloading
    text_field: str = "text"  # field holding the document text
    template: str | None = None  # Python format string over the record's fields, replaces text_field
    weight: float = 1.0  # sampling weight (normalised across the mix)
    min_chars: int = 0  # drop documents shorter than this, characters
    max_chars: int = 0  # drop documents longer than this, characters (0 = no limit)
    sample_by: str = "paragraph"  # local .txt files: one document per line | paragraph (blank-line separated) | document (file)


@dataclass
class DatasetConfig:
    """Where tokens come from and how they are packed."""

    mix: str = "embedded"  # named mix in datasets_file (ignored when sources is non-empty)
    datasets_file: str = "configs/datasets.yaml"  # file of named mixes
    sources: list[DataSourceConfig] = field(default_factory=list)  # inline mix (overrides `mix`)
    tokenizer: str = "embedded"  # embedded | a local tokenizer.json | a hub tokenizer name
    seq_len: int = 1024  # tokens per packed training sequence
    add_bos: bool = False  # prepend BOS to every document (EOS always separates documents)
    # all_exhausted | first_exhausted (HF interleave_datasets). first_exhausted ends each epoch when the
    # smallest source runs out and restarts every source, so larger sources' later documents are never read.
    stopping_strategy: str = "all_exhausted"
    shuffle_buffer: int = 0  # HF shuffle buffer size (0 = off; > 0 loses exact resumption)
    num_workers: int = 0  # DataLoader worker processes
    prefetch_factor: int = 2  # batches prefetched per worker
    pretokenized_dir: str = ""  # token shards from scripts/prepare_data.py (used instead of sources when set)
    seed: int = 0  # seed of mixing and shuffling
    max_bad_records: int = 1000  # malformed records skipped before the stream fails


@dataclass
class EvalConfig:
    """Held-out evaluation during and after training."""

    eval_interval: int = 0  # steps between held-out evaluations (0 = only at the end)
    eval_batches: int = 20  # batches per held-out evaluation
    sample_prompts: list[str] = field(default_factory=lambda: ["The"])  # prompts sampled after training
    sample_tokens: int = 64  # tokens generated per sample
    temperature: float = 0.8  # sampling temperature
    top_k: int = 50  # sampling top-k (0 = off)
    top_p: float = 1.0  # sampling nucleus (1.0 = off)


@dataclass
class WandbConfig:
    """Weights & Biases logging (imported lazily; metrics.jsonl is written regardless)."""

    enabled: bool = False  # log to W&B
    project: str = "foundation-llm"  # W&B project
    entity: str | None = None  # W&B team or user
    run_name: str | None = None  # run display name (None = the output directory's name)
    tags: list[str] = field(default_factory=list)  # run tags
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    log_checkpoints: bool = False  # upload checkpoints as artifacts


@dataclass
class AblationConfig:
    """Axes of an ablation study: each axis maps variant names to dotted-key overrides."""

    # e.g. {"expert_count": {"64k": {"model_config.peer_config.num_experts": 65536, ...}, ...}}
    axes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    tokens_per_run: int = 0  # training tokens per run (0 = the base config's length)
    # How axes combine: one_at_a_time = the base run plus each variant alone (runs grow with the sum of
    # the axes' sizes); grid = every combination (runs grow with their product).
    strategy: str = "one_at_a_time"  # one_at_a_time | grid


@dataclass
class Config:
    """A whole run."""

    model_config: ModelConfig = field(default_factory=ModelConfig)
    train_config: TrainConfig = field(default_factory=TrainConfig)
    dataset_config: DatasetConfig = field(default_factory=DatasetConfig)
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    wandb_config: WandbConfig = field(default_factory=WandbConfig)
    ablation_config: AblationConfig = field(default_factory=AblationConfig)
