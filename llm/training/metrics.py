"""Metric loggers behind one interface, ``log(metrics, step)`` and ``close()``.

- ``JsonlLogger``: ``<output_dir>/metrics.jsonl``, one JSON object per call, always on (rank 0);
- ``ConsoleLogger``: one line per training log step with a progress bar and ETA;
- ``WandbLogger``: Weights & Biases, imported lazily; histograms and images arrive as the ``Histogram``
  and ``Image`` values below, which the other loggers skip (JSONL keeps numbers and strings only).

``build_logger`` composes them; ranks other than 0 get a logger that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
import torch

from llm.config import Config, to_dict
from llm.config.defaults import WandbConfig

MAX_HISTOGRAM_BINS = 512  # W&B rejects histograms with more bins


METRICS_FILE = "metrics.jsonl"  # in the run directory


@dataclass
class Histogram:
    """A histogram already binned: ``counts`` (n,) and ``edges`` (n + 1,), n <= 512."""

    counts: np.ndarray
    edges: np.ndarray

    @classmethod
    def of(cls, values: torch.Tensor | np.ndarray, bins: int = 64) -> Histogram:
        values = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        counts, edges = np.histogram(values.reshape(-1), bins=min(bins, MAX_HISTOGRAM_BINS))
        return cls(counts, edges)


@dataclass
class Image:
    """A PNG already written to ``path``."""

    path: str
    caption: str = ""


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    wandb_id = ""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        return None

    def log_checkpoint(self, path: Path, step: int) -> None:
        return None

    def close(self) -> None:
        return None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (none if it is missing), skipping a torn last line from a killed run."""
    path = Path(path)
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class JsonlLogger:
    """Appends one JSON object per ``log`` call to ``path`` (numbers and strings; NaN written as null).

    ``keep_until_step``: on resume, records after this step (written by the interrupted run past its
    last checkpoint) are dropped, so the file reads like one uninterrupted run. None starts a new file.
    """

    def __init__(self, path: str | Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        kept: list[str] = []
        if keep_until_step is not None:
            kept = [json.dumps(r) for r in read_jsonl(self.path) if r.get("step", 0) <= keep_until_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (bool, int, str)) or value is None:
                record[key] = value
            elif isinstance(value, float):
                record[key] = value if math.isfinite(value) else None
        record.setdefault("time", round(time.time(), 3))
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run loses at most the line being written

    def close(self) -> None:
        self._file.close()


class ConsoleLogger:
    """Prints training lines (those carrying ``loss``) and evaluation lines (``val_*``)."""

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.stream = stream or sys.stdout

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "loss" in metrics:
            line = self.format_train(metrics, step)
        elif any(k.startswith("val_") for k in metrics):
            line = f"step {step}: " + " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k.startswith("val_"))
        else:
            return
        print(line, file=self.stream, flush=True)

    def format_train(self, m: dict[str, Any], step: int) -> str:
        frac = min(step / max(self.total_steps, 1), 1.0)
        width = 20
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        parts = [f"step {step}/{self.total_steps} [{bar}] {frac:4.0%}", f"loss {_fmt(m['loss'], 4)}"]
        if "lr" in m:
            parts.append(f"lr {m['lr']:.2e}")
        if "grad_norm" in m:
            parts.append(f"gnorm {_fmt(m['grad_norm'], 3)}")
        if "tokens_per_s" in m:
            parts.append(f"{_si(m['tokens_per_s'])} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"MFU {m['mfu']:.1%}")
        if "memory_gib" in m:
            parts.append(f"mem {m['memory_gib']:.2f} GiB")
        if m.get("nonfinite_steps"):
            parts.append(f"skipped {m['nonfinite_steps']}")
        if "eta_s" in m:
            parts.append(f"ETA {_duration(m['eta_s'])}")
        return " | ".join(parts)

    def close(self) -> None:
        return None


def wandb_mode(cfg: WandbConfig) -> str:
    """WANDB_MODE from the environment wins (tests set ``disabled``); ``auto`` = online only with an API key."""
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        return "offline" if env == "dryrun" else env
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _has_wandb_key() else "offline"


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


class WandbLogger:
    """Weights & Biases run: metrics, the full resolved config, histograms, images, checkpoint artifacts."""

    def __init__(self, config: Config, mode: str, resume_id: str | None = None) -> None:
        import wandb  # heavy, optional: only when W&B is on

        self._wandb = wandb
        cfg = config.wandb_config
        out = Path(config.train_config.output_dir)
        if mode == "offline" and not _has_wandb_key():
            print(f"W&B: no API key found, logging offline under {out / 'wandb'} (upload later: wandb sync)")
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or out.resolve().name,
            tags=list(cfg.tags),
            mode=mode,
            dir=str(out),
            config=to_dict(config),
            id=resume_id or None,
            resume="allow" if resume_id else None,
        )
        self.log_checkpoints = cfg.log_checkpoints

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        wandb = self._wandb
        data: dict[str, Any] = {}
        for key, value in metrics.items():
            if isinstance(value, Histogram):
                data[key] = wandb.Histogram(np_histogram=(value.counts, value.edges))
            elif isinstance(value, Image):
                data[key] = wandb.Image(value.path, caption=value.caption or None)
            elif isinstance(value, (int, float, bool)):
                data[key] = value
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                data[key] = value.item()
        self.run.log(data, step=step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        if not self.log_checkpoints:
            return
        artifact = self._wandb.Artifact(f"{self.run.id}-checkpoint", type="model", metadata={"step": step})
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

    def close(self) -> None:
        self.run.finish()


class MultiLogger:
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = loggers

    @property
    def wandb_id(self) -> str:
        return next((lg.run_id for lg in self.loggers if isinstance(lg, WandbLogger)), "")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        for logger in self.loggers:
            if hasattr(logger, "log_checkpoint"):
                logger.log_checkpoint(path, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_logger(
    config: Config, is_main: bool, total_steps: int, resume_step: int | None = None, wandb_id: str | None = None
) -> MultiLogger | NullLogger:
    """JSONL + console (+ W&B when enabled and not disabled by mode) on rank 0; a no-op elsewhere."""
    if not is_main:
        return NullLogger()
    out = Path(config.train_config.output_dir)
    loggers: list[Any] = [JsonlLogger(out / METRICS_FILE, keep_until_step=resume_step), ConsoleLogger(total_steps)]
    if config.wandb_config.enabled:
        mode = wandb_mode(config.wandb_config)
        if mode != "disabled":
            loggers.append(WandbLogger(config, mode, resume_id=wandb_id))
    return MultiLogger(loggers)


# ----------------------------------------------------------------------------------------
# Throughput, MFU, memory, ETA
# ----------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device-name substring.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Tokens/s, MFU and ETA between consecutive ``measure`` calls.

    Args:
        flops_per_token: training FLOPs per token (``flops_per_token(...)["training"]``), or None.
        peak: the device's peak FLOP/s times the number of devices, or None (no MFU).
    """

    def __init__(self, flops_per_token: float | None, peak: float | None, total_steps: int, start_step: int) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.total_steps = total_steps
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._last_tokens: int | None = None

    def measure(self, step: int, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        d_tokens = None if self._last_tokens is None else tokens - self._last_tokens
        steps = step - self._last_step
        out: dict[str, float] = {}
        if d_tokens is not None and steps > 0:
            out["tokens_per_s"] = d_tokens / dt
            out["eta_s"] = (self.total_steps - step) * dt / steps
            if self.flops_per_token and self.peak:
                out["mfu"] = out["tokens_per_s"] * self.flops_per_token / self.peak
        self._last_time, self._last_step, self._last_tokens = now, step, tokens
        return out

    def start(self, step: int, tokens: int) -> None:
        """Mark the beginning of a timed interval (after warm-up work such as compile or resume)."""
        self._last_time, self._last_step, self._last_tokens = time.perf_counter(), step, tokens


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
