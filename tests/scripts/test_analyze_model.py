"""scripts/analyze_model.py (library: llm/utils/eval/analysis.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.config import load_config
from llm.utils.eval.size import count_parameters

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "analyze_model.py"
# A tiny PEER model on the embedded data (CPU-sized).
TINY = [
    "model_config.dim=32", "model_config.num_layers=2", "model_config.ffn_hidden_size=64",
    "model_config.peer_config.num_experts=256", "model_config.peer_config.product_key_dim=[16,16]",
    "model_config.peer_config.query_dim=16", "model_config.peer_config.num_heads=2",
    "model_config.mla_config.kv_lora_rank=16", "model_config.mla_config.qk_nope_head_dim=8",
    "model_config.mla_config.qk_rope_head_dim=8", "model_config.mla_config.v_head_dim=8",
    "model_config.mla_config.num_heads=2", "dataset_config.seq_len=32",
]


def load_script():
    spec = importlib.util.spec_from_file_location("analyze_model_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_config_under_ten_seconds_with_png(tmp_path):
    png = tmp_path / "x.png"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "configs/config.yaml", "--output", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 10.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = count_parameters(load_config(ROOT / "configs/config.yaml").model_config)
    out = result.stdout
    assert f"{report.total:,}" in out and f"{report.active:,}" in out
    for needle in ("peer.experts", "total / active", "FLOPs per token", "KV cache per token", "MHA", "block"):
        assert needle in out


def test_config_error_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "configs/config.yaml", "--set", "model_config.peer_config.num_expertz=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "model_config.peer_config.num_expertz" in result.stderr


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--output", "--checkpoint", "--batches", "--verify", "--set"):
        assert flag in text


def test_verify_and_expert_utilisation_from_a_checkpoint(tmp_path, capsys):
    import torch

    from llm.models.foundation import FoundationModel
    from llm.training.checkpoint import Checkpointer

    config = load_config(ROOT / "configs/tiny.yaml", TINY)
    torch.manual_seed(0)
    model = FoundationModel(config.model_config)
    saved = Checkpointer(tmp_path / "run").save(3, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {}, config)
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--verify", "--checkpoint", str(saved), "--batches", "2"]
    for override in TINY:
        argv += ["--set", override]
    assert load_script().main(argv) == 0
    out = capsys.readouterr().out
    assert "verified against the model built on the meta device" in out
    assert "expert utilisation over 256 validation tokens (2 batches of 4)" in out  # seq_len 32
    block, used, kl, *_ = out.splitlines()[-1].split()  # one PEER block: first_k_dense=1 of 2 blocks
    assert block == "1" and 0 < float(used.rstrip("%")) <= 100 and float(kl) >= 0
