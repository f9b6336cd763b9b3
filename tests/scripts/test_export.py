"""scripts/export.py (library: llm.models.hf_export.export_checkpoint)."""

from __future__ import annotations

import json

import pytest
import torch
from script_helpers import load_script as load_helper_script
from script_helpers import save_tiny_checkpoint  # tests/scripts is on sys.path (rootdir-relative imports)

from llm.models.foundation import FoundationModel


def load_script():
    return load_helper_script("export")


def test_export_native_and_refuse_hf_for_peer(tmp_path, capsys):
    config, model, saved = save_tiny_checkpoint(tmp_path / "run", 2)
    model.eval()
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
