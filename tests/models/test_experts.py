"""PEER layer and dense SwiGLU: retrieval, maths against explicit loops, gradients, usage counts, config."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from llm.config.defaults import PEERConfig
from llm.config.errors import ConfigError
from llm.models import experts as experts_module
from llm.models.experts import PEER, SwiGLU
from llm.models.product_keys import brute_force_topk

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def tiny_config(**overrides) -> PEERConfig:
    base = dict(
        num_experts=12,
        product_key_dim=[4, 3],
        num_experts_per_tok=3,
        num_heads=2,
        query_dim=4,
        expert_hidden_size=1,
        kernel="torch",
    )
    base.update(overrides)
    return PEERConfig(**base)


def make_layer(dim=6, dtype=torch.float32, seed=0, **overrides) -> PEER:
    torch.manual_seed(seed)
    return PEER(dim, tiny_config(**overrides)).to(dtype)


def test_shapes_and_public_api():
    layer = make_layer(dim=8, product_key_dim=[2, 3, 2], num_experts=12, query_dim=6)
    x = torch.randn(2, 5, 8)
    assert layer(x).shape == (2, 5, 8)
    parts = layer.subkey_scores(x)
    assert [tuple(p.shape) for p in parts] == [(2, 5, 2, 2), (2, 5, 2, 3), (2, 5, 2, 2)]
    scores, ids = layer.retrieve(x)
    assert scores.shape == ids.shape == (2, 5, 2, 3) and ids.dtype == torch.int64
    assert 0 <= ids.min() and ids.max() < 12
    # Each retrieval score is the sum of the expert's coordinates' sub-key scores (row-major ids).
    coords = [ids // 6, (ids // 2) % 3, ids % 2]
    summed = sum(p.gather(-1, c) for p, c in zip(parts, coords, strict=True))
    torch.testing.assert_close(scores, summed)
    assert torch.all(scores[..., :-1] >= scores[..., 1:])  # sorted descending


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    heads=st.integers(1, 3),
    part_dim=st.integers(1, 3),
    k_frac=st.floats(0.0, 1.0),
    shared=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_retrieve_equals_brute_force(sizes, heads, part_dim, k_frac, shared, seed):
    total = 1
    for n in sizes:
        total *= n
    k = 1 + round(k_frac * (min(total, 10) - 1))
    layer = make_layer(
        dim=5,
        dtype=torch.float64,
        seed=seed,
        num_experts=total,
        product_key_dim=sizes,
        num_experts_per_tok=k,
        num_heads=heads,
        query_dim=part_dim * len(sizes),
        shared_subkeys=shared,
    )
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    scores, ids = layer.retrieve(x)
    want_scores, want_ids = brute_force_topk(layer.subkey_scores(x), k)
    assert torch.equal(ids, want_ids)
    assert torch.equal(scores, want_scores)


GRADCHECK_CASES = {
    "base-softmax-gelu-layernorm": {},
    "sigmoid": {"score_fn": "sigmoid"},
    "relu": {"activation": "relu"},
    "silu-glu": {"activation": "silu", "glu": True},
    "batchnorm": {"query_norm": "batchnorm"},
    "no-norm": {"query_norm": "none"},
    "per-head-subkeys": {"shared_subkeys": False},
    "m3-3parts": {"expert_hidden_size": 3, "product_key_dim": [2, 3, 2], "query_dim": 6},
}


@pytest.mark.parametrize("overrides", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradcheck_float64(overrides):
    layer = make_layer(dim=5, dtype=torch.float64, seed=2, **overrides).train()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)
    # Every parameter (query, norm, sub-keys, tables) receives a gradient.
    fn(x, *params).pow(2).sum().backward()
    for name, p in zip(names, params, strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def explicit_loop(layer: PEER, x_TD: torch.Tensor) -> torch.Tensor:
    """Per-token, per-head, per-expert loop of the PEER formula (no batching, no chunking)."""
    cfg = layer.config
    scores, ids = layer.retrieve(x_TD)
    weights = scores.softmax(-1) if cfg.score_fn == "softmax" else torch.sigmoid(scores)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for h in range(cfg.num_heads):
            for j in range(cfg.num_experts_per_tok):
                i = ids[t, h, j]
                hidden = ACT[cfg.activation](layer.u[i] @ x_TD[t])  # (M,)
                if layer.g is not None:
                    hidden = hidden * (layer.g[i] @ x_TD[t])
                out[t] += weights[t, h, j] * (hidden @ layer.v[i])  # (M,) @ (M, D)
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {"expert_hidden_size": 3},
        {"expert_hidden_size": 4, "glu": True, "activation": "silu", "score_fn": "sigmoid"},
        {"expert_hidden_size": 2, "product_key_dim": [3, 2, 2], "query_dim": 6, "max_gather_mib": 1},
    ],
    ids=["m3", "m4-glu-sigmoid", "m2-3parts"],
)
def test_multi_neuron_experts_equal_explicit_loop(overrides):
    layer = make_layer(dim=6, dtype=torch.float64, seed=4, **overrides).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), explicit_loop(layer, x), rtol=1e-10, atol=1e-12)


def test_usage_counts_equal_recount_from_retrieve():
    layer = make_layer(dim=6, log_expert_usage=True, product_key_dim=[2, 3, 2], query_dim=6).train()
    x = torch.randn(3, 4, 6)
    layer(x)
    layer(x)
    _, ids = layer.retrieve(x)  # (3, 4, H, K)
    want = torch.stack([torch.bincount(ids[..., h, :].reshape(-1), minlength=12) for h in range(2)])
    assert layer.usage_counts.dtype == torch.int64 and layer.usage_counts.shape == (2, 12)
    assert torch.equal(layer.usage_counts, 2 * want)
    assert layer.usage_counts.sum() == 2 * 3 * 4 * 2 * 3
    layer.eval()
    layer(x)
    assert torch.equal(layer.usage_counts, 2 * want), "eval forwards must not count"
    assert "usage_counts" not in layer.state_dict()  # non-persistent: checkpoints ignore it


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_usage_not_counted_twice_under_activation_checkpointing(reentrant):
    layer = make_layer(dim=6, log_expert_usage=True).train()
    x = torch.randn(7, 6, requires_grad=True)
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    _, ids = layer.retrieve(x)
    want = torch.stack([torch.bincount(ids[:, h].reshape(-1), minlength=12) for h in range(2)])
    assert torch.equal(layer.usage_counts, want)


def test_usage_tracking_off_allocates_nothing():
    layer = make_layer(dim=6)
    assert layer.usage_counts is None
    assert not any(b.numel() == 2 * 12 for b in layer.buffers())
    layer.train()(torch.randn(2, 6))  # runs without a buffer


def test_table_param_group():
    layer = make_layer(dim=6, glu=True, table_lr_multiplier=5.0, table_weight_decay=0.01)
    group = layer.table_param_group(lr=1e-3)
    assert group["lr"] == pytest.approx(5e-3) and group["weight_decay"] == 0.01
    assert [id(p) for p in group["params"]] == [id(layer.u), id(layer.v), id(layer.g)]
    assert [id(p) for p in layer.table_parameters()] == [id(layer.u), id(layer.v), id(layer.g)]
    assert layer.u.shape == layer.v.shape == layer.g.shape == (12, 1, 6)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_init_output_is_small_but_gradients_reach_every_table(score_fn):
    torch.manual_seed(0)
    dim = 64
    cfg = tiny_config(num_experts=32**2, product_key_dim=[32, 32], num_experts_per_tok=8, num_heads=4, query_dim=16,
                      score_fn=score_fn)  # fmt: skip
    layer = PEER(dim, cfg)
    x = torch.randn(256, dim)  # unit RMS, like a normed residual stream
    out = layer(x)
    # Documented init: output coordinates have variance ~1/D, i.e. norm ~1 next to an input norm of ~sqrt(D)
    # (sigmoid weights of top-k scores are near 1, not 1/2: assuming 1/2 gave a norm of ~2).
    assert 0.6 < out.norm(dim=-1).mean() < 1.5
    out.sum().backward()
    assert layer.u.grad.abs().sum() > 0 and layer.v.grad.abs().sum() > 0
    assert all(k.grad.abs().sum() > 0 for k in layer.sub_keys)


def test_dropout_applies_in_training_only():
    layer = make_layer(dim=6, dropout=0.5)
    x = torch.randn(50, 6)
    clean = layer.eval()(x)
    torch.manual_seed(1)
    noisy = layer.train()(x)
    dropped = noisy == 0
    assert 0 < dropped.float().mean() < 1
    torch.testing.assert_close(noisy[~dropped], 2 * clean[~dropped])


def test_batchnorm_query_differs_between_train_and_eval():
    # The documented caveat: batch statistics in training, running averages in eval.
    layer = make_layer(dim=6, query_norm="batchnorm")
    x = torch.randn(16, 6) * 3
    assert not torch.allclose(layer.train()(x), layer.eval()(x))


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"num_experts": 13}, "product_key_dim"),
        ({"product_key_dim": [4, 0], "num_experts": 0}, "num_experts"),
        ({"product_key_dim": []}, "product_key_dim"),
        ({"num_experts_per_tok": 13}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"query_dim": 5}, "query_dim"),
        ({"num_heads": 0}, "num_heads"),
        ({"expert_hidden_size": 0}, "expert_hidden_size"),
        ({"query_norm": "rmsnorm"}, "query_norm"),
        ({"score_fn": "relu"}, "score_fn"),
        ({"activation": "tanh"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"kernel": "cuda"}, "kernel"),
        ({"table_lr_multiplier": 0.0}, "table_lr_multiplier"),
        ({"max_gather_mib": 0}, "max_gather_mib"),
    ],
)
def test_bad_config_raises_config_error(overrides, key):
    with pytest.raises(ConfigError, match=f"peer_config.{key}"):
        PEER(6, tiny_config(**overrides))


def test_bad_input_width_raises():
    with pytest.raises(ValueError, match="dim=6"):
        make_layer(dim=6)(torch.randn(2, 5))


def test_config_is_not_mutated():
    cfg = tiny_config()
    before = dataclasses.asdict(cfg)
    PEER(6, cfg)(torch.randn(2, 6))
    assert dataclasses.asdict(cfg) == before


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(6, 10)
    x = torch.randn(2, 3, 6)
    want = (F.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    torch.testing.assert_close(ffn(x), want)
    assert ffn.w1.weight.shape == (10, 6) and ffn.w2.weight.shape == (6, 10)
    with pytest.raises(ValueError, match="hidden_size=0"):
        SwiGLU(6, 0)


def test_retrieval_scores_stay_fp32_under_bf16_autocast():
    layer = make_layer(dim=6)
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(p.dtype == torch.float32 for p in layer.subkey_scores(x))
        scores, _ = layer.retrieve(x)
        assert scores.dtype == torch.float32
        assert layer(x).shape == (5, 6)


def test_meta_device_construction_and_forward():
    # The decoder builds huge configurations on the meta device to count parameters and shapes.
    with torch.device("meta"):
        layer = PEER(16, PEERConfig(num_experts=1024**2, log_expert_usage=True, kernel="torch"))
        out = layer(torch.empty(2, 3, 16))
    assert out.shape == (2, 3, 16) and out.is_meta
    assert layer.u.shape == (1024**2, 1, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync detection needs a CUDA device")
def test_triton_layer_forward_backward_has_no_host_sync():
    """Dense table gradients: no CUDA call in the layer's fwd+bwd waits for the device."""
    cfg = tiny_config(num_experts=64 * 64, product_key_dim=[64, 64], num_experts_per_tok=8, num_heads=4,
                      query_dim=32, kernel="triton")  # fmt: skip
    layer = PEER(64, cfg).cuda()
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    params = [x, *layer.parameters()]
    torch.autograd.grad(layer(x).sum(), params)  # warm-up: kernel compilation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(layer(x).sum(), params)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_kernel_torch_keeps_retrieval_in_pytorch(monkeypatch):
    """``kernel: torch`` means the whole layer runs PyTorch: retrieval is asked not to use its Triton kernels."""
    seen = []
    real = experts_module.retrieve_topk

    def spy(q, keys, k, use_kernels=True):
        seen.append(use_kernels)
        return real(q, keys, k, use_kernels)

    monkeypatch.setattr(experts_module, "retrieve_topk", spy)
    for kernel, expected in (("torch", False), ("auto", True)):
        cfg = PEERConfig(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2, query_dim=8,
                         expert_hidden_size=1, kernel=kernel)  # fmt: skip
        PEER(16, cfg)(torch.randn(3, 16))
        assert seen[-1] is expected
