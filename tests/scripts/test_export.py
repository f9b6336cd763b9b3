"""scripts/export.py (library: llm.models.hf_export.export_checkpoint)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_analyze_model import TINY  # tests/scripts is on sys.path (rootdir-relative imports)

from llm.config import load_config
from llm.models.foundation import FoundationModel
from llm.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("export_script", ROOT / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_native_and_refuse_hf_for_peer(tmp_path, capsys):
    config = load_config(ROOT / "configs/tiny.yaml", TINY)
    torch.manual_seed(0)
    model = FoundationModel(config.model_config).eval()
    saved = Checkpointer(tmp_path / "run").save(2, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {}, config)
    assert load_script().main(["--checkpoint", str(saved), "--output", str(tmp_path / "native")]) == 0
    ids = torch.randint(0, config.model_config.vocab_size, (1, 6))
    assert torch.equal(FoundationModel.from_pretrained(tmp_path / "native").eval()(ids), model(ids))
    assert json.loads((tmp_path / "native" / "config.json").read_text())["format"] == "foundation-llm"
    capsys.readouterr()
    code = load_script().main(["--checkpoint", str(saved), "--output", str(tmp_path / "hf"), "--format", "hf"])
    assert code == 2 and "use PEER" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--output", "--format"):
        assert flag in text
