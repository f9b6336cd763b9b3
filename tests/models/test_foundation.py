"""The decoder (llm/models/foundation.py): counts, init, loss, masking, meta construction."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from llm.config import ConfigError
from llm.config.defaults import MLAConfig, ModelConfig, PEERConfig
from llm.models.experts import PEER, SwiGLU
from llm.models.foundation import FoundationModel
from llm.utils.eval.size import count_parameters


def tiny_config(**overrides) -> ModelConfig:
    """3 blocks: 0 dense, 1 and 2 PEER (64 experts)."""
    cfg = ModelConfig(
        vocab_size=37, dim=16, num_layers=3, max_seq_len=32, ffn_hidden_size=24, first_k_dense=1, peer_every_n=1,
        peer_config=PEERConfig(
            num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2, query_dim=8, kernel="torch",
        ),
        mla_config=MLAConfig(num_heads=2, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def component_of(name: str) -> str:
    """The size.py component of a parameter name (an independent classification for the test)."""
    if name == "embed.weight":
        return "embedding"
    if name == "head.weight":
        return "lm_head"
    if name == "norm.weight":
        return "final_norm"
    sub = name.split(".", 2)[2]  # strip "layers.<i>."
    table = {
        "attn_norm": "block_norms", "ffn_norm": "block_norms", "attn.wq": "attention.q", "attn.wq_a": "attention.q",
        "attn.wq_b": "attention.q", "attn.wkv_a": "attention.kv_down", "attn.wkv_b": "attention.kv_up",
        "attn.wo": "attention.out", "attn.q_norm": "attention.norms", "attn.kv_norm": "attention.norms",
        "ffn.w1": "dense_ffn", "ffn.w2": "dense_ffn", "ffn.w3": "dense_ffn", "ffn.query": "peer.query",
        "ffn.query_norm": "peer.query", "ffn.sub_keys": "peer.subkeys", "ffn.u": "peer.experts",
        "ffn.v": "peer.experts", "ffn.g": "peer.experts",
    }
    for prefix, component in table.items():
        if sub == prefix or sub.startswith(prefix + "."):
            return component
    raise AssertionError(f"unclassified parameter {name}")


def _variants():
    yield "base", tiny_config()
    yield "tied", tiny_config(tie_embeddings=True)
    cfg = tiny_config(peer_layers=[0, 2])
    cfg.mla_config.q_lora_rank = 6
    cfg.peer_config.glu = True
    cfg.peer_config.shared_subkeys = False
    cfg.peer_config.expert_hidden_size = 2
    cfg.peer_config.query_norm = "batchnorm"
    cfg.peer_config.product_key_dim = [4, 4, 4]
    cfg.peer_config.query_dim = 6
    yield "q_lora-glu-per_head-batchnorm-3parts", cfg
    yield "all_dense", tiny_config(peer_every_n=0)


@pytest.mark.parametrize("name,cfg", list(_variants()), ids=[n for n, _ in _variants()])
def test_size_report_equals_the_real_model(name, cfg):
    torch.manual_seed(0)
    model = FoundationModel(cfg)
    report = count_parameters(cfg)
    assert sum(p.numel() for p in model.parameters()) == report.total
    by_component: dict[str, int] = {}
    by_layer: dict[int, int] = {}
    for pname, p in model.named_parameters():
        comp = component_of(pname)
        by_component[comp] = by_component.get(comp, 0) + p.numel()
        if pname.startswith("layers."):
            i = int(pname.split(".")[1])
            by_layer[i] = by_layer.get(i, 0) + p.numel()
    assert by_component == {k: c.total for k, c in report.by_component.items() if c.total}
    assert by_layer == {layer.index: layer.total for layer in report.by_layer}
    # active per token in a PEER block: only h*k experts of the tables are read
    peers = [i for i, _ in model.peer_modules()]
    assert peers == [layer.index for layer in report.by_layer if layer.ffn == "peer"]


def test_million_expert_config_builds_on_meta_device_quickly():
    cfg = ModelConfig(num_layers=12, first_k_dense=2, peer_every_n=3)  # 1024^2 experts per PEER block
    start = time.perf_counter()
    with torch.device("meta"):
        model = FoundationModel(cfg)
    assert time.perf_counter() - start < 20.0  # generous for loaded CI machines; real tables would take minutes
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    assert [i for i, _ in model.peer_modules()] == [2, 5, 8, 11]


def test_forward_shapes_and_layer_types():
    cfg = tiny_config()
    model = FoundationModel(cfg)
    logits = model(torch.randint(0, cfg.vocab_size, (2, 7)))
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == torch.float32
    assert [type(b.ffn) for b in model.layers] == [SwiGLU, PEER, PEER]


def test_init_scales_residual_projections():
    cfg = tiny_config(dim=64, ffn_hidden_size=256, num_layers=2, vocab_size=512, init_std=0.05)
    cfg.mla_config.num_heads = 8
    torch.manual_seed(0)
    model = FoundationModel(cfg)
    residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    assert model.embed.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert model.head.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert model.layers[0].attn.wkv_a.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert model.layers[0].ffn.w1.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert model.layers[0].ffn.w2.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.layers[1].attn.wo.weight.std().item() == pytest.approx(residual, rel=0.1)
    assert torch.equal(model.layers[1].attn_norm.weight, torch.ones(cfg.dim))
    # PEER keeps its own init: u rows N(0, 1/D)
    assert model.layers[1].ffn.u.std().item() == pytest.approx(cfg.dim**-0.5, rel=0.1)
    tied = FoundationModel(tiny_config(tie_embeddings=True))
    assert tied.head.weight is tied.embed.weight


def test_loss_is_cross_entropy_plus_z_loss_and_ignores_padding():
    cfg = tiny_config(z_loss=1e-2)
    torch.manual_seed(0)
    model = FoundationModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = torch.randint(0, cfg.vocab_size, (2, 9))
    labels[0, :3] = -100
    loss, parts = model.loss(ids, labels)
    logits = model(ids)
    keep = labels != -100
    ce = F.cross_entropy(logits[keep], labels[keep])
    z = torch.logsumexp(logits[keep], dim=-1).pow(2).mean()
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["z_loss"], z)
    torch.testing.assert_close(loss, ce + 1e-2 * z)
    assert not parts["ce"].requires_grad
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.layers[1].ffn.u.grad.abs().sum() > 0


def test_z_loss_off_reports_zero():
    model = FoundationModel(tiny_config())
    ids = torch.randint(0, 37, (1, 5))
    loss, parts = model.loss(ids, ids)
    assert parts["z_loss"].item() == 0.0 and loss.item() == pytest.approx(parts["ce"].item())


def test_document_masking_isolates_packed_documents():
    cfg = tiny_config()
    cfg.mla_config.document_masking = True
    torch.manual_seed(0)
    model = FoundationModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6])
    packed = model(ids, doc_ids=doc_ids)
    alone = model(ids[:, 4:])
    # RoPE is relative, so the second document's logits equal those of the document on its own.
    torch.testing.assert_close(packed[:, 4:], alone, atol=1e-5, rtol=1e-5)
    cfg_off = tiny_config()
    model_off = FoundationModel(cfg_off).eval()
    model_off.load_state_dict(model.state_dict())
    torch.testing.assert_close(model_off(ids, doc_ids=doc_ids), model_off(ids))  # switch off: ignored


def test_flex_document_mask_is_built_once_per_forward(monkeypatch):
    from torch.nn.attention import flex_attention as flex_module

    calls = []
    real = flex_module.create_block_mask
    monkeypatch.setattr(flex_module, "create_block_mask", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = tiny_config()
    cfg.mla_config.document_masking = True
    cfg.mla_config.attention_backend = "flex"
    torch.manual_seed(0)
    model = FoundationModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 3])
    with torch.no_grad():  # flex has no CPU backward
        flex = model(ids, doc_ids=doc_ids)
    assert len(calls) == 1  # one block mask shared by the 3 blocks
    cfg.mla_config.attention_backend = "math"
    with torch.no_grad():
        torch.testing.assert_close(flex, model(ids, doc_ids=doc_ids), atol=1e-5, rtol=1e-5)


def test_bad_config_raises_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="model_config.peer_layers"):
        FoundationModel(tiny_config(peer_layers=[5]))


def test_training_loss_traces_as_one_graph():
    """torch.compile sees the whole model: no graph break from attention, PEER routing or usage counting."""
    import torch._dynamo

    cfg = tiny_config()
    cfg.peer_config.log_expert_usage = True
    model = FoundationModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    explained = torch._dynamo.explain(lambda ids: model.loss(ids, ids)[0])(ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_equals_full_loss_and_never_builds_all_logits():
    torch.manual_seed(0)
    cfg = tiny_config(z_loss=1e-3, vocab_size=4000)  # logits (30 x 4000) outsize every weight
    model = FoundationModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 10))
    labels = ids.roll(-1, dims=1)
    labels[0, :4] = -100  # ignored positions inside a chunk
    grads, losses, largest = [], [], []
    for chunk in (0, 7):  # 30 tokens: chunks of 7 leave a ragged last chunk of 2
        model.config.loss_chunk_tokens = chunk
        model.zero_grad()
        with _LargestOutput() as mode:
            loss, parts = model.loss(ids, labels)
            loss.backward()
        losses.append((loss.detach(), parts["ce"], parts["z_loss"]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        largest.append(mode.largest)
    for full, chunked in zip(*losses, strict=True):
        torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
    all_logits = 30 * cfg.vocab_size
    assert largest[0] >= all_logits > largest[1]  # the (tokens, vocab) logits only exist per chunk
