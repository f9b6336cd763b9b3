"""Helpers shared by the data tests: small generated corpora (never the network)."""

from __future__ import annotations

import json
from pathlib import Path

from llm.config.defaults import DatasetConfig


def write_jsonl(path: Path, texts: list[str], extra_lines: tuple[bytes, ...] = ()) -> Path:
    with open(path, "wb") as f:
        for t in texts:
            f.write((json.dumps({"text": t, "n": len(t)}) + "\n").encode())
        for line in extra_lines:
            f.write(line + b"\n")
    return path


def docs(prefix: str, n: int) -> list[str]:
    """Distinct documents of varied length whose first word identifies them."""
    return [f"{prefix}{i:03d} " + " ".join(["lorem", "ipsum", "dolor"][j % 3] for j in range(i % 11 + 2)) for i in range(n)]


def dataset_config(sources=(), **kw) -> DatasetConfig:
    return DatasetConfig(sources=list(sources), **{"seq_len": 16, **kw})
