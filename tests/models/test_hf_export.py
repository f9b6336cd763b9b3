"""Saving and exporting (llm/models/hf_export.py): native round trip, HF DeepseekV3 logits, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from test_foundation import tiny_config  # tests/models is on sys.path (rootdir-relative imports)

from llm.config import Config, ConfigError
from llm.config.defaults import YarnConfig
from llm.models.foundation import FoundationModel
from llm.models.hf_export import export_checkpoint, export_hf, model_from_checkpoint
from llm.training.checkpoint import Checkpointer, CheckpointError


def test_native_round_trip_with_peer_and_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(tie_embeddings=True)
    cfg.peer_config.log_expert_usage = True
    model = FoundationModel(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = FoundationModel.from_pretrained(tmp_path).eval()
    assert loaded.config == cfg
    assert loaded.head.weight is loaded.embed.weight
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    assert torch.equal(model(ids), loaded(ids))


def test_from_pretrained_rejects_other_directories(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        FoundationModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(ConfigError, match="not a native"):
        FoundationModel.from_pretrained(tmp_path)


def _hf_logits(directory, ids):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        return hf.eval()(ids).logits


@pytest.mark.parametrize(
    "q_lora_rank,tied,yarn",
    [(6, False, True), (0, True, False)],
    ids=["q_lora-untied-yarn", "wq-tied-plain_rope"],
)
def test_export_hf_logits_match_transformers(tmp_path, q_lora_rank, tied, yarn):
    torch.manual_seed(0)
    cfg = tiny_config(peer_every_n=0, tie_embeddings=tied, max_seq_len=64)
    cfg.mla_config.q_lora_rank = q_lora_rank
    cfg.mla_config.rope_theta = 500.0
    if yarn:  # positions past the original context, mscale != mscale_all_dim; factor x original != max_seq_len
        cfg.mla_config.yarn = YarnConfig(factor=2.0, original_max_position_embeddings=16, mscale=0.7, mscale_all_dim=1.0)
    model = FoundationModel(cfg).eval()
    export_hf(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "deepseek_v3" and hf_config["first_k_dense_replace"] == cfg.num_layers
    assert (hf_config["rope_scaling"] is not None) == yarn
    # transformers 4.x (e.g. 4.53) takes YaRN's factor as max_position_embeddings / original: keep them equal
    assert hf_config["max_position_embeddings"] == (32 if yarn else 64)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(_hf_logits(tmp_path, ids), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_export_hf_logits_match_transformers_for_every_yarn_temperature(tmp_path, mscale, mscale_all_dim):
    """transformers reads mscale / mscale_all_dim differently from DeepSeek's code when either is 0 (the
    default mscale_all_dim is 0); the export writes the coefficients in effect. Queries and keys are scaled
    up so attention is far from uniform and a wrong temperature shows in the logits."""
    torch.manual_seed(1)
    cfg = tiny_config(peer_every_n=0, max_seq_len=64)
    cfg.mla_config.rope_theta = 500.0
    cfg.mla_config.yarn = YarnConfig(factor=4.0, original_max_position_embeddings=16, mscale=mscale,
                                     mscale_all_dim=mscale_all_dim)  # fmt: skip
    model = FoundationModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.wq.weight", "attn.wkv_b.weight")):
                p.mul_(8.0)
    export_hf(model, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(_hf_logits(tmp_path, ids), ours, atol=1e-4, rtol=1e-4)


def test_export_hf_refuses_peer_models(tmp_path):
    with pytest.raises(ValueError, match=r"blocks \[1, 2\] use PEER"):
        FoundationModel(tiny_config()).export_hf(tmp_path)


def test_checkpoint_export_both_formats(tmp_path):
    torch.manual_seed(0)
    config = Config()
    config.model_config = tiny_config(peer_layers=[])
    config.dataset_config.seq_len = 16
    model = FoundationModel(config.model_config).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    saved = Checkpointer(run).save(7, model, opt, {}, {}, config)
    _, restored = model_from_checkpoint(run)  # a run directory resolves to its latest checkpoint
    ids = torch.randint(0, 37, (1, 5))
    assert torch.equal(restored.eval()(ids), model(ids))
    export_checkpoint(saved, tmp_path / "native", "native")
    assert torch.equal(FoundationModel.from_pretrained(tmp_path / "native").eval()(ids), model(ids))
    export_checkpoint(saved, tmp_path / "hf", "hf")
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), model(ids).detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="run directory"):
        model_from_checkpoint(tmp_path / "nothing")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--output: .* is a file"):
        export_checkpoint(saved, tmp_path / "a_file", "native")


def test_find_checkpoint_skips_a_truncated_newest_checkpoint(tmp_path):
    from llm.models.hf_export import find_checkpoint

    config = Config()
    config.model_config = tiny_config()
    config.dataset_config.seq_len = 16
    model = FoundationModel(config.model_config)
    ckpt = Checkpointer(tmp_path / "run")
    first = ckpt.save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {}, config)
    second = ckpt.save(2, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {}, config)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a crash mid-copy after the marker was written
    assert find_checkpoint(tmp_path / "run") == first  # as --resume falls back, so do analysis tools
    with pytest.raises(CheckpointError, match="truncated"):
        find_checkpoint(second)
