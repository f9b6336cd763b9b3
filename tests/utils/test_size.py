"""Parameter, FLOP and KV-cache counts from the config (llm/utils/eval/size.py)."""

from __future__ import annotations

import time

import pytest

from llm.config.defaults import MLAConfig, ModelConfig, PEERConfig, peer_layer_indices
from llm.utils.eval.size import (
    COMPONENTS,
    count_parameters,
    flops_per_token,
    kv_cache_bytes_per_token,
)


def small_config(**overrides) -> ModelConfig:
    """2 blocks: block 0 dense, block 1 PEER (16 experts, 2 heads x 2 experts per token)."""
    cfg = ModelConfig(
        vocab_size=10,
        dim=4,
        num_layers=2,
        max_seq_len=16,
        ffn_hidden_size=6,
        first_k_dense=1,
        peer_every_n=1,
        peer_config=PEERConfig(
            num_experts=16, product_key_dim=[4, 4], num_experts_per_tok=2, num_heads=2, query_dim=4,
            query_norm="layernorm",
        ),
        mla_config=MLAConfig(num_heads=2, q_lora_rank=0, kv_lora_rank=3, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_hand_count_small_config():
    r = count_parameters(small_config())
    # attention per block: wq 4*2*4=32, wkv_a 4*(3+2)=20, wkv_b 3*2*(2+2)=24, wo 2*2*4=16, kv_norm 3
    assert r.by_component["attention.q"].total == 2 * 32
    assert r.by_component["attention.kv_down"].total == 2 * 20
    assert r.by_component["attention.kv_up"].total == 2 * 24
    assert r.by_component["attention.out"].total == 2 * 16
    assert r.by_component["attention.norms"].total == 2 * 3
    assert r.by_component["dense_ffn"].total == 3 * 4 * 6
    assert r.by_component["peer.query"].total == 4 * 2 * 4 + 2 * 4  # projection + affine LayerNorm(4)
    assert r.by_component["peer.subkeys"].total == (4 + 4) * 2
    assert r.by_component["peer.experts"].total == 16 * 2 * 4  # u and v rows of D=4
    assert r.by_component["peer.experts"].active == 2 * 2 * 2 * 4  # h*k experts, u and v
    # embedding 40 + head 40 + attention 190 + block norms 16 + dense 72 + query 40 + subkeys 16
    # + experts 128 + final norm 4
    assert r.total == 546
    assert r.active == 546 - 128 + 32
    assert r.active_non_embedding == r.active - 40
    assert r.total == sum(layer.total for layer in r.by_layer) + 40 + 40 + 4
    assert [layer.ffn for layer in r.by_layer] == ["dense", "peer"]
    assert r.by_layer[1].active == r.by_layer[1].total - 128 + 32
    assert r.efficiency_ratio == pytest.approx(546 / 450)


def test_variants_change_counts_as_expected():
    base = count_parameters(small_config())
    tied = count_parameters(small_config(tie_embeddings=True))
    assert tied.total == base.total - 40
    assert tied.active_non_embedding == tied.active  # the tied head is the embedding, still used
    cfg = small_config()
    cfg.peer_config.glu = True
    cfg.peer_config.shared_subkeys = False
    cfg.peer_config.expert_hidden_size = 3
    r = count_parameters(cfg)
    assert r.by_component["peer.experts"].total == 16 * 3 * 3 * 4
    assert r.by_component["peer.experts"].active == 2 * 2 * 3 * 3 * 4
    assert r.by_component["peer.subkeys"].total == (4 + 4) * 2 * 2
    cfg = small_config()
    cfg.mla_config.q_lora_rank = 5
    r = count_parameters(cfg)
    assert r.by_component["attention.q"].total == 2 * (4 * 5 + 5 * 2 * 4)
    assert r.by_component["attention.norms"].total == 2 * (5 + 3)


def test_peer_layer_indices_patterns():
    cfg = ModelConfig(num_layers=12, first_k_dense=2, peer_every_n=3)
    assert peer_layer_indices(cfg) == [2, 5, 8, 11]
    assert peer_layer_indices(ModelConfig(num_layers=4, peer_every_n=0)) == []
    assert peer_layer_indices(ModelConfig(num_layers=4, peer_layers=[3, 1])) == [1, 3]
    assert [layer.ffn for layer in count_parameters(cfg).by_layer].count("peer") == 4


def test_flops_dense_model_by_hand():
    cfg = small_config(peer_every_n=0)
    f = flops_per_token(cfg, seq_len=7)
    # matmul weights: 2 blocks x (attention 92 + dense 72) + head 40 = 368
    assert f["matmul"] == 2 * 368
    # each token attends (7+1)/2 = 4 keys; per key 2*H*(qk 4 + v 2) = 24 FLOPs; 2 blocks
    assert f["attention"] == 2 * 24 * 4
    assert f["forward"] == f["matmul"] + f["attention"]
    assert f["training"] == 3 * f["forward"]


def test_flops_peer_counts_selected_experts_and_scoring():
    cfg = small_config()
    f = flops_per_token(cfg, seq_len=1)
    # block 1: query projection 32, 2 heads x 8 sub-keys x 2 dims = 32, experts 32
    weights = 2 * 92 + 72 + 32 + 32 + 32 + 40
    assert f["matmul"] == 2 * weights


def test_kv_cache_bytes():
    kv = kv_cache_bytes_per_token(small_config(), bytes_per_value=2)
    assert kv["mla"] == (3 + 2) * 2 * 2
    assert kv["mha"] == 2 * (4 + 2) * 2 * 2
    assert kv["gqa"] == kv["mha"]  # 2 heads <= 8 groups


def test_million_expert_config_is_instant():
    cfg = ModelConfig(num_layers=12, first_k_dense=2, peer_every_n=3)  # defaults: 1024^2 experts
    start = time.perf_counter()
    r = count_parameters(cfg)
    flops_per_token(cfg, 2048)
    assert time.perf_counter() - start < 1.0  # counting, not allocating: 6.6 B parameters would take minutes
    assert r.by_component["peer.experts"].total == 4 * 2 * 1024**2 * 768
    assert set(r.by_component) == set(COMPONENTS)
