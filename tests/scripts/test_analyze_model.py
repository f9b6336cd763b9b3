"""scripts/analyze_model.py (library: llm/utils/eval/analysis.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from script_helpers import ROOT, TINY, save_tiny_checkpoint
from script_helpers import load_script as load_helper_script

from llm.config import load_config
from llm.utils.eval.size import count_parameters

SCRIPT = ROOT / "scripts" / "analyze_model.py"


def load_script():
    return load_helper_script("analyze_model")


def test_reference_config_under_ten_seconds_with_png(tmp_path):
    png = tmp_path / "x.png"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", "configs/config.yaml", "--output", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
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
        cwd=ROOT, capture_output=True, text=True, timeout=300,
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
    _, _, saved = save_tiny_checkpoint(tmp_path / "run", 3)
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--verify", "--checkpoint", str(saved), "--batches", "2"]
    for override in [*TINY, "model_config.peer_config.kernel=torch"]:  # differs, but not in any count
        argv += ["--set", override]
    assert load_script().main(argv) == 0
    out = capsys.readouterr().out
    assert "verified against the model built on the meta device" in out
    assert "counts are for the checkpoint's model" not in out  # --config describes the same model
    assert "expert utilisation over 256 validation tokens (2 batches of 4)" in out  # seq_len 32
    block, used, kl, *_ = out.splitlines()[-1].split()  # one PEER block: first_k_dense=1 of 2 blocks
    assert block == "1" and 0 < float(used.rstrip("%")) <= 100 and float(kl) >= 0


def test_counts_describe_the_checkpoints_model_when_config_differs(tmp_path, capsys):
    """--config with another model (here 3 blocks and 4 retrieval heads) than the checkpoint's: the counts (and
    their --verify) follow the checkpoint's model, whose utilisation is measured, and the report says so."""
    _, model, saved = save_tiny_checkpoint(tmp_path / "run", 3)
    argv = ["--config", str(ROOT / "configs/tiny.yaml"), "--verify", "--checkpoint", str(saved), "--batches", "1"]
    for override in [*TINY, "model_config.num_layers=3", "model_config.peer_config.num_heads=4"]:
        argv += ["--set", override]
    assert load_script().main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"counts are for the checkpoint's model ({saved / 'config.yaml'}), which differs from")
    assert "model_config.num_layers" in out.splitlines()[0] and "num_heads" in out.splitlines()[0]
    built = sum(p.numel() for p in model.parameters())
    assert f"verified against the model built on the meta device: {built:,}" in out


def test_evaluation_uses_the_checkpoints_tokenizer(tmp_path):
    """--config may name another tokenizer (e.g. a study's data config): the checkpoint's model reads
    its own tokenizer's ids, so the result is the same; --batches below 1 is refused."""
    from llm.config import load_config
    from llm.data.tokenizer import train_bpe
    from llm.utils.eval.perplexity import evaluate_checkpoint

    _, _, saved = save_tiny_checkpoint(tmp_path / "run", 3)
    other = train_bpe(["words of another tokenizer"] * 20, vocab_size=300)
    other.save(tmp_path / "other_tok")
    base = load_config(ROOT / "configs/tiny.yaml", TINY)
    with_other = load_config(ROOT / "configs/tiny.yaml", [*TINY, f"dataset_config.tokenizer={tmp_path / 'other_tok'}"])
    assert evaluate_checkpoint(saved, with_other, batches=2) == evaluate_checkpoint(saved, base, batches=2)
    with pytest.raises(ValueError, match="--batches: got -1; must be >= 1"):
        evaluate_checkpoint(saved, base, batches=-1)
    longer = load_config(ROOT / "configs/tiny.yaml", [*TINY, "model_config.max_seq_len=1024", "dataset_config.seq_len=1024"])
    with pytest.raises(ValueError, match="seq_len: 1024 exceeds the checkpoint model's max_seq_len"):
        evaluate_checkpoint(saved, longer, batches=1)


def test_expert_utilisation_counts_real_tokens_only(tmp_path):
    """A validation split of one short document fills its batch with padding: only real positions count."""
    import json

    from llm.utils.eval.analysis import expert_utilisation

    _, _, saved = save_tiny_checkpoint(tmp_path / "run", 3)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"train document {i}"}) + "\n" for i in range(20)))
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "short"}) + "\n")
    source = f"{{type: local, path: {tmp_path / 'train.jsonl'}, validation_split: {tmp_path / 'val.jsonl'}}}"
    config = load_config(ROOT / "configs/tiny.yaml", [*TINY, f"dataset_config.sources=[{source}]"])
    report = expert_utilisation(config, saved, num_batches=1, batch_size=4)
    tokens = int(report.split("expert utilisation over ")[1].split(" ")[0].replace(",", ""))
    assert 0 < tokens < 16, report  # a few real tokens, not 4 x 32 padded positions


def test_evaluation_without_held_out_data_is_an_error_not_nan(tmp_path, capsys):
    """A mix with no validation split and no holdout_documents scores no token: run_evaluation says why
    (exit 2) instead of printing NaN; analyze_model says utilisation was not measured."""
    import json

    from llm.utils.eval.analysis import expert_utilisation

    _, _, saved = save_tiny_checkpoint(tmp_path / "run", 3)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(5)))
    src = f"dataset_config.sources=[{{name: t, type: local, path: {tmp_path / 'train.jsonl'}}}]"
    overrides = [arg for kv in [*TINY, src] for arg in ("--set", kv)]
    code = load_helper_script("run_evaluation").main(
        ["--checkpoint", str(saved), "--config", str(ROOT / "configs/tiny.yaml"), *overrides]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: dataset_config: no held-out tokens") and err.count("\n") == 1
    config = load_config(ROOT / "configs/tiny.yaml", [*TINY, src])
    assert expert_utilisation(config, saved, num_batches=2).startswith("expert utilisation: not measured")


def test_evaluation_of_a_model_with_chunked_loss_equals_full_logits(tmp_path):
    """The FoundationModel is scored through its own (chunked) loss, never the full fp32 logits; the
    perplexity equals cross-entropy over its logits."""
    import math

    import torch
    import torch.nn.functional as F

    from llm.models.foundation import FoundationModel
    from llm.utils.eval.perplexity import evaluate_perplexity

    config = load_config(ROOT / "configs/tiny.yaml", [*TINY, "model_config.loss_chunk_tokens=16"])
    torch.manual_seed(0)
    model = FoundationModel(config.model_config)
    ids = torch.randint(0, config.model_config.vocab_size, (2, 32))
    labels = torch.roll(ids, -1, dims=1)
    labels[1, 20:] = -100
    got = evaluate_perplexity(model, [{"input_ids": ids, "labels": labels}], 1, torch.device("cpu"))
    with torch.no_grad():
        logits = model(ids)
    want = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert got["tokens"] == 32 + 20 and math.isclose(got["loss"], float(want), rel_tol=1e-5)
