"""scripts/generate.py (library: llm.models.generation.generate_text)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_analyze_model import TINY  # tests/scripts is on sys.path (rootdir-relative imports)

from llm.config import load_config
from llm.models.foundation import FoundationModel
from llm.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_from_a_run_directory(tmp_path, capsys):
    config = load_config(ROOT / "configs/tiny.yaml", TINY)
    torch.manual_seed(0)
    model = FoundationModel(config.model_config)
    Checkpointer(tmp_path).save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {}, config)
    argv = ["--checkpoint", str(tmp_path), "--prompt", "The", "--prompt", "", "--max-new-tokens", "5", "--seed", "1"]
    assert load_script().main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("The") and first.count("-" * 40) == 2
    assert load_script().main(argv) == 0
    assert capsys.readouterr().out == first  # seeded


def test_errors_exit_2_and_help(tmp_path, capsys):
    assert load_script().main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_script().main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                 "--device", "--no-cache"):
        assert flag in text
