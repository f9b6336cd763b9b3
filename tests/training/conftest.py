"""Fixtures for trainer tests (helpers live in trainer_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import ROOT, tiny_overrides


@pytest.fixture
def tiny_config(tmp_path):
    from llm.config import load_config

    def make(*extra: str, output_dir: Path | None = None):
        return load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides(output_dir or tmp_path / "run", *extra))

    return make
