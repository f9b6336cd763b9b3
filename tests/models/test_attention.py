"""MultiHeadLatentAttention: expanded == absorbed, cached decoding == full forward, gradients,
document masking, backends, and equality with Hugging Face's DeepseekV3Attention."""

import dataclasses

import pytest
import torch

from llm.config.defaults import MLAConfig, YarnConfig
from llm.config.errors import ConfigError
from llm.models.attention import MultiHeadLatentAttention
from llm.models.hf_mapping import mla_state_dict_from_hf, mla_state_dict_to_hf

DIM = 24
YARN = YarnConfig(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def make_config(q_lora_rank: int = 0, **kw) -> MLAConfig:
    base = dict(
        num_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6,
        v_head_dim=5, rope_theta=10000.0, yarn=YARN, decode_backend="torch",
    )
    base.update(kw)
    return MLAConfig(**base)


def make_attn(q_lora_rank: int = 0, seed: int = 0, **kw) -> MultiHeadLatentAttention:
    torch.manual_seed(seed)
    attn = MultiHeadLatentAttention(DIM, make_config(q_lora_rank, **kw), max_seq_len=96)
    with torch.no_grad():  # non-trivial norm gains so a mixed-up norm would show
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return attn.eval()


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"max abs err {err}"


@pytest.mark.parametrize("q_lora_rank", [0, 12], ids=["wq", "wq_a-wq_b"])
def test_expanded_equals_absorbed(q_lora_rank):
    attn = make_attn(q_lora_rank)
    x = torch.randn(2, 11, DIM)
    positions = torch.arange(37, 48)  # past YaRN's original context, so the interpolated frequencies matter
    full = attn(x, positions=positions)
    cache = attn.make_cache(2, 40, dtype=torch.float32)
    absorbed = attn(x, positions=positions, cache=cache)
    assert cache.length == 11
    assert_close(absorbed, full)


@pytest.mark.parametrize("q_lora_rank", [0, 12], ids=["wq", "wq_a-wq_b"])
def test_token_by_token_decoding_equals_full_forward(q_lora_rank):
    attn = make_attn(q_lora_rank)
    x = torch.randn(2, 70, DIM)  # crosses a 64-token cache block
    full = attn(x)
    cache = attn.make_cache(2, 80, dtype=torch.float32)
    steps = [attn(x[:, i : i + 1], cache=cache) for i in range(x.shape[1])]
    assert_close(torch.cat(steps, dim=1), full)


def test_prefill_then_multi_token_appends_equal_full_forward():
    attn = make_attn(12)
    x = torch.randn(2, 23, DIM)
    full = attn(x)
    cache = attn.make_cache(2, 32, dtype=torch.float32)
    pieces, start = [], 0
    for size in [9, 1, 4, 1, 8]:
        pieces.append(attn(x[:, start : start + size], cache=cache))
        start += size
    assert cache.length == 23
    assert_close(torch.cat(pieces, dim=1), full)


def test_decode_with_triton_backend_matches_torch():
    x = torch.randn(1, 10, DIM)
    outs = []
    for backend in ["torch", "triton"]:
        attn = make_attn(0, decode_backend=backend)
        cache = attn.make_cache(1, 16, dtype=torch.float32)
        outs.append(torch.cat([attn(x[:, :7], cache=cache), attn(x[:, 7:8], cache=cache), attn(x[:, 8:], cache=cache)], 1))
    assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [0, 12], ids=["wq", "wq_a-wq_b"])
def test_gradients_reach_every_weight(q_lora_rank):
    attn = make_attn(q_lora_rank).train()
    x = torch.randn(2, 7, DIM, requires_grad=True)
    attn(x).square().sum().backward()
    names = {n for n, _ in attn.named_parameters()}
    expected = {"wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight"}
    expected |= {"wq.weight"} if q_lora_rank == 0 else {"wq_a.weight", "q_norm.weight", "wq_b.weight"}
    assert names == expected
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_document_masking_equals_separate_documents():
    attn = make_attn(12)
    lengths = [5, 9, 3]
    x = torch.randn(1, sum(lengths), DIM)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]  # (1, T)
    # Positions restart in each document, as a packed-sequence loader would give them.
    positions = torch.cat([torch.arange(n) for n in lengths])
    packed = attn(x, positions=positions, doc_ids=doc_ids)
    separate = torch.cat([attn(chunk) for chunk in x.split(lengths, dim=1)], dim=1)
    assert_close(packed, separate)
    # Without the mask the later documents see earlier ones.
    assert not torch.allclose(attn(x, positions=positions)[:, 5:], separate[:, 5:], atol=1e-4)


def test_flex_backend_matches_math_with_document_mask():
    x = torch.randn(2, 10, DIM)
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    with torch.no_grad():  # flex has no CPU backward
        ref = make_attn(0, attention_backend="math")(x, doc_ids=doc_ids)
        flex = make_attn(0, attention_backend="flex")(x, doc_ids=doc_ids)
    assert_close(flex, ref, atol=1e-5, rtol=1e-4)


def test_requested_backend_that_cannot_run_raises_clear_error():
    attn = make_attn(0, attention_backend="cudnn")  # cuDNN needs CUDA
    with pytest.raises(ValueError, match="mla_config.attention_backend: 'cudnn' cannot run"):
        attn(torch.randn(1, 4, DIM))
    # FlexAttention has no backward on CPU (these tensors are CPU ones): training with it is refused alike
    attn = make_attn(0, attention_backend="flex")
    with pytest.raises(ValueError, match="mla_config.attention_backend: 'flex' cannot run"):
        attn(torch.randn(1, 4, DIM, requires_grad=True))


def test_bad_config_values_raise_config_error():
    with pytest.raises(ConfigError, match="mla_config.attention_backend"):
        make_attn(0, attention_backend="sdpa")
    with pytest.raises(ConfigError, match="mla_config.qk_rope_head_dim"):
        make_attn(0, qk_rope_head_dim=5)
    with pytest.raises(ValueError, match="flash_mla"):
        make_attn(0, decode_backend="flash_mla")(torch.randn(1, 2, DIM), cache=make_attn(0).make_cache(1, 4))
    with pytest.raises(ValueError, match="max_seq_len=96"):
        make_attn(0).make_cache(1, 97)


# ----------------------------------------------------------------------------------------
# Hugging Face transformers' DeepseekV3Attention with the same weights
# ----------------------------------------------------------------------------------------


def _hf_attention(cfg: MLAConfig, rope_interleave: bool):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    y = cfg.yarn
    hf_cfg = DeepseekV3Config(
        hidden_size=DIM, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, max_position_embeddings=96,
        rope_interleave=rope_interleave, num_hidden_layers=1, vocab_size=8,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings, "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow, "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
        },
    )
    hf_cfg._attn_implementation = "eager"
    return DeepseekV3Attention(hf_cfg, layer_idx=0).eval(), DeepseekV3RotaryEmbedding(hf_cfg)


@pytest.mark.parametrize(
    "q_lora_rank,rope_interleave,mscale",
    [(12, True, 1.0), (0, True, 1.0), (12, False, 0.7)],
    ids=["q_lora-interleaved", "wq-interleaved", "q_lora-half-mscale0.7"],
)
def test_matches_hugging_face_deepseek_v3_attention(q_lora_rank, rope_interleave, mscale):
    yarn = dataclasses.replace(YARN, mscale=mscale)  # mscale != mscale_all_dim: cos/sin scaled too
    attn = make_attn(q_lora_rank, yarn=yarn)
    hf_attn, hf_rope = _hf_attention(attn.config, rope_interleave)
    hf_sd = mla_state_dict_to_hf(attn.state_dict(), attn.config, rope_interleave=rope_interleave)
    hf_attn.load_state_dict(hf_sd, strict=True)
    assert attn.softmax_scale == pytest.approx(hf_attn.scaling, rel=1e-12)

    x = torch.randn(2, 13, DIM)
    positions = torch.arange(30, 43)
    cos, sin = hf_rope(x, positions[None].expand(2, -1))
    mask = torch.full((13, 13), float("-inf")).triu(1)[None, None]  # additive causal mask
    expected, _ = hf_attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    assert_close(attn(x, positions=positions), expected)
    # and the import maps back to the very same tensors
    back = mla_state_dict_from_hf(hf_sd, attn.config, rope_interleave=rope_interleave)
    assert back.keys() == attn.state_dict().keys()
    for k, v in attn.state_dict().items():
        assert torch.equal(back[k], v), k


def test_flash_backend_pads_values_to_the_qk_width():
    from llm.models.attention import causal_attention

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 12, generator=gen), torch.randn(2, 3, 9, 12, generator=gen)
    v = torch.randn(2, 3, 9, 8, generator=gen)  # MLA: v narrower than qk, which flash alone refuses
    ref = causal_attention(q, k, v, 0.3, None, "math")
    out = causal_attention(q, k, v, 0.3, None, "flash")
    assert out.shape == v.shape
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
