#!/usr/bin/env python
"""Train a model from a YAML config.

    python scripts/train.py --config configs/tiny.yaml [--set train_config.lr=3e-4 ...]
"""

from __future__ import annotations

import argparse
import sys

from llm.config import ConfigError, dump_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. train_config.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(dump_config(config), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
