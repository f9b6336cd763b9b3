"""A W&B offline run writes its files: metrics, expert-usage histograms, the sub-key heatmap, config."""

from __future__ import annotations

import json
import time

from llm.training import train as train_mod


def _read_when_written(path, marker: bytes, timeout_s: float = 60.0) -> bytes:
    """The file's bytes once they hold ``marker``: wandb's service process may still be flushing the
    offline log when ``finish()`` returns on a loaded machine (a 2-core CI run once read only the
    header), so the test waits for the write instead of racing it."""
    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes()
        if marker in data or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_offline_run_writes_metrics_histograms_and_heatmap(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(
        "wandb_config.enabled=true", "wandb_config.run_name=probe", "wandb_config.tags=[test]",
        "wandb_config.log_checkpoints=true", "train_config.max_steps=4", "train_config.log_interval=2",
        "train_config.checkpoint_interval=4", "model_config.peer_config.log_expert_usage=true",
        "model_config.peer_config.log_freq=2", "eval_config.sample_tokens=0",
    )  # fmt: skip
    result = train_mod.train(config)
    assert result.status == "completed"
    runs = [p for p in tmp_path.rglob("offline-run-*") if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    # wandb 0.31 writes no summary file offline; the protobuf event log holds every record, with
    # history values as JSON text, so the keys and value types can be checked in its bytes.
    (log_file,) = run.glob("run-*.wandb")
    log = _read_when_written(log_file, b"experts/layer1/heatmap")
    for key in (b"loss", b"lr", b"grad_norm", b"tokens", b"val_perplexity", b"experts/layer1/kl_uniform"):
        assert key in log, key
    assert log.count(b"experts/layer1/count_hist") >= 2 and b'"histogram"' in log
    assert b"experts/layer1/heatmap" in log and b'"image-file"' in log
    assert b"peer_config" in log and b"product_key_dim" in log  # the full resolved config
    assert b"step_4" in log and b"latest" in log  # checkpoint artifact aliases
    images = sorted((run / "files" / "media" / "images" / "experts" / "layer1").glob("heatmap_*.png"))
    assert [p.name.split("_")[1] for p in images] == ["2", "4"]
    # The same heatmaps are kept locally, and metrics.jsonl has the scalar usage statistics.
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "expert_usage").glob("*.png")) == [
        "layer01_step00000002.png", "layer01_step00000004.png"
    ]  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    usage = [r for r in records if "experts/layer1/usage_fraction" in r]
    assert [r["step"] for r in usage] == [2, 4] and 0 < usage[0]["experts/layer1/usage_fraction"] <= 1
