#!/usr/bin/env python
"""Parameter counts (total and active per token), FLOPs, KV-cache size and expert utilisation of a model.

    python scripts/analyze_model.py --config configs/config.yaml
    python scripts/analyze_model.py --config configs/config.yaml --output model_analysis.png
    python scripts/analyze_model.py --config configs/tiny.yaml --checkpoint runs/tiny/checkpoints/step_00000300

Counts come from the config alone (no weights are allocated), so configs with millions of experts
take about a second. With --checkpoint the trained model also runs over validation batches to
measure how evenly its PEER layers use their experts; the counts then describe the checkpoint's
model (its config.yaml), and the report says so where that differs from --config.
"""

from __future__ import annotations

import argparse
import sys

from llm.config import ConfigError, load_config
from llm.config.cli import add_config_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, example="model_config.num_layers=24")
    parser.add_argument("--output", default=None, metavar="PNG", help="write a total-vs-active parameter chart here")
    parser.add_argument(
        "--checkpoint", default=None, metavar="DIR",
        help="checkpoint directory (step_XXXXXXXX) whose expert utilisation to measure on validation data",
    )
    parser.add_argument(
        "--batches", type=int, default=8, help="validation batches run for expert utilisation (with --checkpoint)"
    )
    parser.add_argument(
        "--verify", action="store_true",
        help="also build the model on the meta device (no memory) and check the counts against it",
    )
    args = parser.parse_args(argv)
    # ValueError covers ConfigError and data/tokenizer errors (e.g. a hub tokenizer while offline).
    errors: tuple[type[Exception], ...] = (ValueError, OSError)
    if args.checkpoint:  # torch is imported only when a checkpoint is read
        from llm.training.checkpoint import CheckpointError

        errors += (CheckpointError,)
    try:
        config = load_config(args.config, args.overrides)
        if args.batches < 1:
            raise ConfigError(f"--batches: got {args.batches}; must be >= 1")
        from llm.utils.eval.analysis import analyze_model

        print(
            analyze_model(
                config, output=args.output, checkpoint=args.checkpoint, batches=args.batches, verify=args.verify
            )
        )
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
