"""Model size from the config alone: parameters (total and active per token), FLOPs, KV-cache bytes.

Nothing here builds a module or allocates a tensor, so a config with millions of experts is
analysed in microseconds. ``tests/utils/test_size.py`` checks every count against
``sum(p.numel())`` of a real model, so a change to a module's parameters must be mirrored here.

Conventions (stated once, used everywhere):
- **Active parameters per token** are those a token's forward pass reads: everything except the
  experts a PEER layer does not select (``num_heads * num_experts_per_tok`` experts are read per
  token per PEER layer; all sub-keys are scored, so they are active). The input embedding table
  counts in full in ``active`` (like the total) and not at all in ``active_non_embedding``; a
  tied LM head counts once, as the embedding.
- **FLOPs per token** count a multiply-add as 2 FLOPs over the matmul parameters a token uses
  (embedding lookup excluded, LM head included), the sub-key scoring of every head, and the
  attention of a causal sequence of ``seq_len`` tokens: on average a token attends to
  ``(seq_len + 1) / 2`` keys, each costing ``2 * H * (qk_head_dim + v_head_dim)``. Training is
  3x forward (backward = 2x forward). Norms, softmax, activations and top-k are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.config.defaults import MLAConfig, ModelConfig, PEERConfig, peer_layer_indices

# Component names of the breakdown, in display order.
COMPONENTS = (
    "embedding",
    "attention.q",  # wq, or wq_a + wq_b
    "attention.kv_down",  # wkv_a: x -> [c_kv | k_pe]
    "attention.kv_up",  # wkv_b: c_kv -> per-head [k_nope | v]
    "attention.out",  # wo
    "attention.norms",  # q_norm (with q compression) and kv_norm
    "block_norms",  # attn_norm and ffn_norm of each block
    "dense_ffn",  # SwiGLU w1, w2, w3
    "peer.query",  # query projection and query normalisation
    "peer.subkeys",  # product-key sub-key tables
    "peer.experts",  # expert tables u, v (and g for GLU experts)
    "final_norm",
    "lm_head",
)


@dataclass
class Count:
    """Parameters of one component: all of them, and those one token reads."""

    total: int = 0
    active: int = 0

    def add(self, other: Count) -> None:
        self.total += other.total
        self.active += other.active


@dataclass
class LayerReport:
    index: int
    ffn: str  # "dense" | "peer"
    components: dict[str, Count]

    @property
    def total(self) -> int:
        return sum(c.total for c in self.components.values())

    @property
    def active(self) -> int:
        return sum(c.active for c in self.components.values())


@dataclass
class ParameterReport:
    """``count_parameters`` result. ``by_component`` sums the blocks; ``by_layer`` holds each block."""

    total: int
    active: int  # per token, input embedding table counted in full (see module docstring)
    active_non_embedding: int  # per token, input embedding excluded
    by_component: dict[str, Count]
    by_layer: list[LayerReport] = field(default_factory=list)

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.by_component["embedding"].total

    @property
    def efficiency_ratio(self) -> float:
        """Total over active parameters: how many parameters the model holds per one it uses."""
        return self.total / self.active


# ----------------------------------------------------------------------------------------
# Per-module counts (each mirrors the module's parameters exactly)
# ----------------------------------------------------------------------------------------


def mla_parameters(dim: int, cfg: MLAConfig) -> dict[str, int]:
    """Parameters of ``MultiHeadLatentAttention(dim, cfg)`` by component (all are active)."""
    h = cfg.num_heads
    qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank == 0:
        q, q_norm = dim * h * qk_head, 0
    else:
        q, q_norm = dim * cfg.q_lora_rank + cfg.q_lora_rank * h * qk_head, cfg.q_lora_rank
    return {
        "attention.q": q,
        "attention.kv_down": dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "attention.kv_up": cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
        "attention.out": h * cfg.v_head_dim * dim,
        "attention.norms": q_norm + cfg.kv_lora_rank,
    }


def swiglu_parameters(dim: int, hidden: int) -> int:
    """``SwiGLU(dim, hidden)``: gate, up and down projections without biases."""
    return 3 * dim * hidden


def peer_parameters(dim: int, cfg: PEERConfig) -> dict[str, Count]:
    """Parameters of ``PEER(dim, cfg)`` by component, with those one token reads."""
    h, parts = cfg.num_heads, len(cfg.product_key_dim)
    query = dim * h * cfg.query_dim
    if cfg.query_norm == "layernorm":  # affine LayerNorm over each head's query
        query += 2 * cfg.query_dim
    elif cfg.query_norm == "batchnorm":  # affine BatchNorm over all heads' query features
        query += 2 * h * cfg.query_dim
    sub_dim = cfg.query_dim // parts
    subkeys = sum(cfg.product_key_dim) * sub_dim * (1 if cfg.shared_subkeys else h)
    tables = 3 if cfg.glu else 2
    per_expert = tables * cfg.expert_hidden_size * dim
    return {
        "peer.query": Count(query, query),
        "peer.subkeys": Count(subkeys, subkeys),
        "peer.experts": Count(cfg.num_experts * per_expert, h * cfg.num_experts_per_tok * per_expert),
    }


# ----------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------


def count_parameters(model_config: ModelConfig) -> ParameterReport:
    """Total and per-token active parameters of ``FoundationModel(model_config)``, by component and block."""
    cfg = model_config
    d = cfg.dim
    peer_set = set(peer_layer_indices(cfg))
    attention = {k: Count(v, v) for k, v in mla_parameters(d, cfg.mla_config).items()}
    layers = []
    for i in range(cfg.num_layers):
        comps = {k: Count(c.total, c.active) for k, c in attention.items()}
        comps["block_norms"] = Count(2 * d, 2 * d)
        if i in peer_set:
            comps.update(peer_parameters(d, cfg.peer_config))
        else:
            n = swiglu_parameters(d, cfg.ffn_hidden_size)
            comps["dense_ffn"] = Count(n, n)
        layers.append(LayerReport(i, "peer" if i in peer_set else "dense", comps))

    by_component = {name: Count() for name in COMPONENTS}
    embed = cfg.vocab_size * d
    by_component["embedding"] = Count(embed, embed)
    for layer in layers:
        for name, c in layer.components.items():
            by_component[name].add(c)
    by_component["final_norm"] = Count(d, d)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    by_component["lm_head"] = Count(head, head)

    total = sum(c.total for c in by_component.values())
    active = sum(c.active for c in by_component.values())
    # A tied head is the embedding matrix, used as a matmul: it stays active without the embedding.
    non_embedding = active - (0 if cfg.tie_embeddings else embed)
    return ParameterReport(total, active, non_embedding, by_component, layers)


def attention_flops_per_token(model_config: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of the score and value products per token, all blocks, causal (see module docstring)."""
    m = model_config.mla_config
    per_key = 2 * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return model_config.num_layers * per_key * (seq_len + 1) // 2


def flops_per_token(model_config: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward and training FLOPs per token: ``{"forward", "training", "matmul", "attention"}``.

    ``matmul`` is 2 x the weights a token multiplies with: the attention projections, the dense
    FFN or the PEER query projection, every head's scoring of the sub-keys and the selected
    experts, and the LM head (the embedding lookup and norm gains are not matmuls);
    ``attention`` is ``attention_flops_per_token``. MFU uses ``training``.
    """
    cfg, p = model_config, model_config.peer_config
    d = cfg.dim
    mla = mla_parameters(d, cfg.mla_config)
    attn = sum(v for k, v in mla.items() if k != "attention.norms")
    num_peer = len(peer_layer_indices(cfg))
    dense = swiglu_parameters(d, cfg.ffn_hidden_size)
    # Every head scores every sub-key (shared or not); top-k and the merge are not counted.
    scoring = p.num_heads * sum(p.product_key_dim) * (p.query_dim // len(p.product_key_dim))
    peer = d * p.num_heads * p.query_dim + scoring + peer_parameters(d, p)["peer.experts"].active
    weights = cfg.num_layers * attn + num_peer * peer + (cfg.num_layers - num_peer) * dense + cfg.vocab_size * d
    matmul = 2 * weights
    attention = attention_flops_per_token(cfg, seq_len)
    forward = matmul + attention
    return {"forward": forward, "training": 3 * forward, "matmul": matmul, "attention": attention}


def kv_cache_bytes_per_token(model_config: ModelConfig, bytes_per_value: int = 2, gqa_kv_heads: int = 8) -> dict[str, int]:
    """Cache bytes per token over all blocks: MLA's latent cache vs MHA and GQA of the same head dims.

    MLA stores ``kv_lora_rank + qk_rope_head_dim`` values per token per block; MHA stores every
    head's key (nope + rope) and value; GQA stores ``min(gqa_kv_heads, H)`` heads' worth.
    """
    m = model_config.mla_config
    per_head = m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim
    per_value = bytes_per_value * model_config.num_layers
    return {
        "mla": (m.kv_lora_rank + m.qk_rope_head_dim) * per_value,
        "mha": m.num_heads * per_head * per_value,
        "gqa": min(gqa_kv_heads, m.num_heads) * per_head * per_value,
        "gqa_kv_heads": min(gqa_kv_heads, m.num_heads),
    }
