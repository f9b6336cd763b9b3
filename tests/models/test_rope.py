"""RoPE + YaRN: frequencies against Hugging Face's YaRN, the temperature rule, rotation properties."""

import math

import pytest
import torch

from llm.config.defaults import MLAConfig, YarnConfig
from llm.models.rope import RotaryEmbedding, apply_rope, cos_sin_scale, rope_inv_freq, softmax_scale, yarn_mscale


def test_plain_rope_frequencies():
    inv = rope_inv_freq(8, 10000.0, YarnConfig(factor=1.0))
    assert torch.allclose(inv, 10000.0 ** (-torch.arange(0, 8, 2) / 8))


@pytest.mark.parametrize("factor,beta_fast,beta_slow", [(4.0, 32.0, 1.0), (40.0, 32.0, 1.0), (8.0, 16.0, 2.0)])
def test_yarn_frequencies_match_hugging_face(factor, beta_fast, beta_slow):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": 64,
        "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0,
    }
    cfg = DeepseekV3Config(qk_rope_head_dim=32, rope_parameters=params, max_position_embeddings=64 * int(factor))
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    yarn = YarnConfig(factor=factor, original_max_position_embeddings=64, beta_fast=beta_fast, beta_slow=beta_slow,
                      mscale=1.0, mscale_all_dim=1.0)
    ours = rope_inv_freq(32, 10000.0, yarn)
    assert torch.allclose(ours, hf_inv.float(), rtol=1e-6, atol=0)
    assert cos_sin_scale(yarn) == pytest.approx(hf_scale)
    # the fastest pair keeps its frequency, the slowest is interpolated by the factor
    plain = rope_inv_freq(32, 10000.0, YarnConfig())
    assert ours[0] == plain[0] and ours[-1] == pytest.approx(plain[-1].item() / factor)


def test_softmax_scale_uses_mscale_squared():
    cfg = MLAConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, yarn=YarnConfig(factor=40.0, mscale=1.0, mscale_all_dim=1.0))
    m = 0.1 * math.log(40.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * m * m)
    assert softmax_scale(MLAConfig(qk_nope_head_dim=128, qk_rope_head_dim=64)) == pytest.approx(192**-0.5)
    assert yarn_mscale(1.0, 5.0) == 1.0


def test_rotation_keeps_norms_and_depends_only_on_relative_position():
    cfg = MLAConfig(qk_rope_head_dim=16, yarn=YarnConfig(factor=4.0, original_max_position_embeddings=32))
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)  # (B, T, H, R)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([pq]))
        ck, sk = rope(torch.tensor([pk]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)

    assert torch.allclose(score(7, 3), score(107, 103), atol=1e-4)
    cos, sin = rope(torch.tensor([5]))
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)


def test_half_rotation_pairs_dim_i_with_dim_i_plus_half():
    rope = RotaryEmbedding(MLAConfig(qk_rope_head_dim=4))
    cos, sin = rope(torch.tensor([1]))
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # (B, T, R): x_0 = 1
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out, torch.tensor([[[math.cos(1.0), 0.0, math.sin(1.0), 0.0]]]), atol=1e-6)


def test_apply_rope_keeps_dtype_and_accepts_batched_positions():
    rope = RotaryEmbedding(MLAConfig(qk_rope_head_dim=8))
    x = torch.randn(2, 3, 4, 8, dtype=torch.bfloat16)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    out = apply_rope(x, *rope(pos))
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    ref = apply_rope(x[1:], *rope(pos[1]))
    assert torch.equal(out[1:], ref)
