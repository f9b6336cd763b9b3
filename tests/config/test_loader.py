"""llm/config/loader.py: YAML + overrides -> typed Config, round trips, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm.config import Config, ConfigError, config_diff, dump_config, load_config, save_config
from llm.config.loader import dotted_keys, parse_override

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if p.name != "datasets.yaml"]


def test_defaults_are_valid():
    config = load_config(None)
    assert isinstance(config, Config)
    assert config.model_config.peer_config.product_key_dim == [1024, 1024]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.train_config.max_steps >= 1


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_round_trip(path, tmp_path):
    overrides = ["train_config.lr=1e-3", "model_config.peer_config.num_heads=2", "wandb_config.tags=[a, b]"]
    config = load_config(path, overrides)
    saved = save_config(config, tmp_path / "resolved.yaml")
    again = load_config(saved)
    assert again == config
    assert dump_config(again) == dump_config(config)
    assert config_diff(config, again) == []


def test_yaml_overrides_defaults_and_cli_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_config:\n  lr: 0.01\n  max_steps: 7\n")
    config = load_config(path, ["train_config.lr=3e-4"])
    assert config.train_config.lr == pytest.approx(3e-4)
    assert config.train_config.max_steps == 7
    assert config.train_config.batch_size == Config().train_config.batch_size


def test_override_values_are_typed():
    config = load_config(None, ["model_config.peer_config.product_key_dim=[16, 8, 2]",
                                "model_config.peer_config.num_experts=256",
                                "model_config.tie_embeddings=true",
                                "model_config.peer_layers=null",
                                "model_config.peer_config.query_dim=48"])
    assert config.model_config.peer_config.product_key_dim == [16, 8, 2]
    assert config.model_config.tie_embeddings is True
    assert config.model_config.peer_layers is None


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_config:\n  lr: 3e-4\n")  # PyYAML reads this as a string
    assert load_config(path).train_config.lr == pytest.approx(3e-4)


def test_integral_float_accepted_for_int():
    assert load_config(None, ["train_config.max_tokens=5e9"]).train_config.max_tokens == 5_000_000_000


def test_config_diff_names_fields():
    a = load_config(None)
    b = load_config(None, ["train_config.lr=1.0", "model_config.mla_config.num_heads=4"])
    assert config_diff(a, b) == ["model_config.mla_config.num_heads", "train_config.lr"]


def test_dotted_keys_cover_spec_names():
    keys = set(dotted_keys())
    for name in ["num_experts", "product_key_dim", "num_experts_per_tok", "num_heads", "expert_hidden_size",
                 "log_expert_usage", "log_freq"]:
        assert f"model_config.peer_config.{name}" in keys
    for name in ["q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"]:
        assert f"model_config.mla_config.{name}" in keys
    for name in ["output_dir", "max_steps", "checkpoint_interval", "log_interval", "seed"]:
        assert f"train_config.{name}" in keys


def test_parse_override():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("no_equals_sign")


def test_cli_unknown_key_is_one_line_with_suggestion():
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/config.yaml",
         "--set", "model_config.peer_config.num_expertz=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model_config.peer_config.num_expertz" in lines[0]
    assert "num_experts" in lines[0].replace("num_expertz", "")
    assert "Traceback" not in proc.stderr


def test_retired_keys_of_older_configs_are_ignored_with_a_warning(tmp_path, caplog):
    """A checkpoint's config.yaml written by an older version still loads; other unknown keys stay errors."""
    path = tmp_path / "old.yaml"
    path.write_text("eval_config:\n  metrics: [perplexity]\n  eval_batches: 3\n")
    with caplog.at_level("WARNING", logger="llm.config.loader"):
        assert load_config(path).eval_config.eval_batches == 3
    assert "eval_config.metrics: no longer used" in caplog.text
    path.write_text("eval_config:\n  metricz: [perplexity]\n")
    with pytest.raises(ConfigError, match="eval_config.metricz: unknown key"):
        load_config(path)
