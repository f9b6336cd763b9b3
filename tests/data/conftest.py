"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import docs, write_jsonl

from llm.config.defaults import DataSourceConfig


@pytest.fixture
def two_sources(tmp_path: Path) -> list[DataSourceConfig]:
    write_jsonl(tmp_path / "a.jsonl", docs("alpha", 60))
    write_jsonl(tmp_path / "b.jsonl", docs("beta", 30))
    write_jsonl(tmp_path / "a_val.jsonl", docs("aval", 9))
    return [
        DataSourceConfig(name="a", type="local", path=str(tmp_path / "a.jsonl"), weight=3.0,
                         validation_split=str(tmp_path / "a_val.jsonl")),
        DataSourceConfig(name="b", type="local", path=str(tmp_path / "b.jsonl"), weight=1.0),
    ]

