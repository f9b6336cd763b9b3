"""The command-line face of the config: ``--config`` and repeatable ``--set`` shared by every script."""

from __future__ import annotations

import argparse


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_help: str = "YAML config file (see configs/)",
    example: str = "train_config.lr=3e-4",
) -> None:
    """Add ``--config PATH`` (required) and ``--set KEY=VALUE`` (repeatable, into ``args.overrides``)."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value by dotted key, e.g. {example} (repeatable; the value is parsed as YAML)",
    )  # fmt: skip
