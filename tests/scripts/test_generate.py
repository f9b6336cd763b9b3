"""scripts/generate.py (library: llm.models.generation.generate_text)."""

from __future__ import annotations

import pytest
from script_helpers import load_script as load_helper_script
from script_helpers import save_tiny_checkpoint  # tests/scripts is on sys.path (rootdir-relative imports)


def load_script():
    return load_helper_script("generate")


def test_generate_from_a_run_directory(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path, 1)
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


@pytest.mark.parametrize("device,message", [("foo", "is not a torch device"), ("cuda:99", "CUDA device")])
def test_bad_device_is_one_line_error(tmp_path, capsys, device, message):
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--checkpoint", str(tmp_path), "--device", device])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --device: {device!r}" in err and message in err
