"""Metric loggers: JSONL (always), console line, W&B mode resolution, histogram binning."""

from __future__ import annotations

import io
import json

import numpy as np
import torch

from llm.config import Config
from llm.config.defaults import WandbConfig
from llm.training.metrics import (
    ConsoleLogger,
    Histogram,
    Image,
    JsonlLogger,
    MultiLogger,
    NullLogger,
    Throughput,
    build_logger,
    wandb_mode,
)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_keeps_numbers_and_strings_and_skips_media(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log({"loss": torch.tensor(2.5), "lr": 1e-3, "tokens": 64, "bad": float("nan"), "tag": "x",
                "h": Histogram.of(torch.arange(10)), "img": Image("a.png")}, step=3)  # fmt: skip
    logger.close()
    (record,) = _read(tmp_path / "metrics.jsonl")
    assert record["step"] == 3 and record["loss"] == 2.5 and record["tokens"] == 64 and record["tag"] == "x"
    assert record["bad"] is None and "h" not in record and "img" not in record


def test_jsonl_resume_drops_records_past_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    for step in range(1, 6):
        logger.log({"loss": float(step)}, step)
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-line
    resumed = JsonlLogger(path, keep_until_step=3)
    resumed.log({"loss": 40.0}, 4)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in _read(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    JsonlLogger(path).close()  # a fresh run starts a new file
    assert path.read_text() == ""


def test_console_line_has_the_promised_fields():
    out = io.StringIO()
    ConsoleLogger(total_steps=100, stream=out).log(
        {"loss": 3.25, "lr": 3e-4, "grad_norm": 0.5, "tokens_per_s": 12345.0, "mfu": 0.41, "memory_gib": 1.5,
         "eta_s": 3725.0, "tokens": 1}, step=50)  # fmt: skip
    line = out.getvalue()
    for part in ("step 50/100", "[##########----------]", "loss 3.2500", "lr 3.00e-04", "gnorm 0.500",
                 "12.3k tok/s", "MFU 41.0%", "mem 1.50 GiB", "ETA 1h02m"):  # fmt: skip
        assert part in line, (part, line)


def test_wandb_mode_env_wins_then_config_then_key(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(WandbConfig(mode="online")) == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(WandbConfig(mode="offline")) == "offline"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert wandb_mode(WandbConfig(mode="auto")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_mode(WandbConfig(mode="auto")) == "online"


def test_histogram_never_exceeds_512_bins():
    h = Histogram.of(np.random.default_rng(0).normal(size=5000), bins=10_000)
    assert len(h.counts) == 512 and len(h.edges) == 513 and h.counts.sum() == 5000


def test_build_logger_rank0_jsonl_console_others_nothing(tmp_path):
    config = Config()
    config.train_config.output_dir = str(tmp_path)
    config.wandb_config.enabled = True  # WANDB_MODE=disabled (tests) keeps W&B out
    logger = build_logger(config, is_main=True, total_steps=10)
    assert isinstance(logger, MultiLogger) and len(logger.loggers) == 2 and logger.wandb_id == ""
    logger.close()
    assert (tmp_path / "metrics.jsonl").is_file()
    assert isinstance(build_logger(config, is_main=False, total_steps=10), NullLogger)


def test_throughput_rates_and_eta():
    meter = Throughput(flops_per_token=6.0, peak=1e3, total_steps=20, start_step=0)
    meter.start(0, 0)
    meter._last_time -= 2.0  # pretend 2 s passed
    out = meter.measure(10, 1000)
    assert 450 < out["tokens_per_s"] <= 500 and 1.8 < out["eta_s"] < 2.2
    assert abs(out["mfu"] - out["tokens_per_s"] * 6.0 / 1e3) < 1e-9
