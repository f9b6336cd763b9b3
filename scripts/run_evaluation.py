#!/usr/bin/env python
"""Held-out perplexity of a checkpoint on its config's validation data.

    python scripts/run_evaluation.py --checkpoint runs/tiny/checkpoints/step_00000300 --config configs/tiny.yaml
    python scripts/run_evaluation.py --checkpoint runs/tiny --config configs/tiny.yaml --batches 50

``--checkpoint`` is a checkpoint folder, or a run directory (its latest complete checkpoint).
Prints one JSON line: {"checkpoint", "loss", "perplexity", "tokens"}. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from llm.config import ConfigError, load_config
from llm.config.cli import add_config_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run directory")
    add_config_arguments(parser, "YAML config whose dataset_config names the validation data", "eval_config.eval_batches=50")
    parser.add_argument(
        "--batches", type=int, default=None, help="validation batches (default eval_config.eval_batches)"
    )
    args = parser.parse_args(argv)

    from llm.training.checkpoint import CheckpointError, find_model_checkpoint
    from llm.utils.eval.perplexity import evaluate_checkpoint

    try:
        config = load_config(args.config, args.overrides)
        path = find_model_checkpoint(args.checkpoint)
        result = evaluate_checkpoint(path, config, args.batches)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(path), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
