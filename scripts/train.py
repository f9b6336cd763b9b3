#!/usr/bin/env python
"""Train a model from a YAML config (single process, or one process per GPU under torchrun).

    python scripts/train.py --config configs/tiny.yaml [--set train_config.lr=3e-4 ...]
    python scripts/train.py --config configs/tiny.yaml --resume            # latest valid checkpoint
    python scripts/train.py --config configs/tiny.yaml --resume runs/tiny/checkpoints/step_00000100
    torchrun --nproc-per-node 2 scripts/train.py --config configs/tiny.yaml

Exit status: 0 finished or interrupted (checkpoint saved), 1 stopped on non-finite losses,
2 bad input (config, output directory, checkpoint) reported in one line, 3 a checkpoint could not be
written (disk full, I/O error; the previous one is intact), reported in one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llm.config import ConfigError, dump_config, load_config
from llm.config.cli import add_config_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="PATH",
        help="continue from the latest valid checkpoint of output_dir, or from PATH (a checkpoint or run folder)",
    )  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--check", action="store_true",
        help="check the config, output directory and tokenizer, then exit (train.sh runs it before torchrun)",
    )  # fmt: skip
    parser.add_argument(
        "--world-size", type=int, default=1, metavar="N",
        help="with --check: the number of processes the run will have (train.sh passes nnodes x gpus-per-node)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    from llm.training.checkpoint import CheckpointError, CheckpointWriteError
    from llm.training.train import preflight, train

    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(config), end="")
            return 0
        if args.check:
            preflight(config, args.resume, args.world_size)
            return 0
        result = train(config, resume=args.resume)
    except CheckpointWriteError as exc:  # not the input's fault: a separate status
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if result.status == "nonfinite" else 0


if __name__ == "__main__":
    sys.exit(main())
