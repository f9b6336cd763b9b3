#!/usr/bin/env python
"""Ablation study: train variants of a base config along named axes, one process per run, and rank them.

    python scripts/run_ablations.py --base-config configs/config.yaml --output-dir ablation_results --gpus 4
    python scripts/run_ablations.py --base-config configs/config.yaml --output-dir ablation_results --axes data_mix expert_count
    python scripts/run_ablations.py --base-config configs/config.yaml --tokens 5000000000
    python scripts/run_ablations.py --resume --output-dir ablation_results
    python scripts/run_ablations.py --custom-datasets configs/datasets.yaml --output-dir ablation_results

Built-in axes (derived from the base config; ablation_config.axes adds or replaces axes):
  data_mix      every usable mix of the datasets file
  expert_count  product-key parts / 4, / 2, / 1 (N = 256^2, 512^2, 1024^2 for a 1024^2 base)
  expert_size   expert_hidden_size 1, 4, 16 at equal total expert parameters (N scaled by 1/m)
  product_dims  2, 3, 4 product-key parts with the same N
  num_heads     h/2, h, 2h retrieval heads with h*k constant
Results: <output-dir>/results.md (ranking by held-out loss, best config, per-axis tables) and results.csv.
Exit status: 0 every run finished, 1 a run failed or was interrupted (rerun with --resume),
2 bad input (config, axes, datasets, output directory) reported in one line before anything trains.
"""

from __future__ import annotations

import argparse
import sys

from llm.training.ablation import STRATEGIES, ablate


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2 (argparse prints the usage too)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def tokens(text: str) -> int:
    """An integer token count; 5e9 and 5_000_000_000 are accepted."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 5000000000, got {text!r}") from None
    if not value.is_integer() or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base-config", default=None, metavar="PATH", help="base YAML config (default configs/config.yaml)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a base-config value by dotted key, e.g. train_config.lr=3e-4 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--output-dir", default="ablation_results", help="study folder (default ablation_results)")
    parser.add_argument("--axes", nargs="+", metavar="AXIS", help="axes to ablate (default: all; see above)")
    parser.add_argument(
        "--strategy", choices=STRATEGIES, default=None,
        help="one_at_a_time: base run + each variant alone; grid: every combination "
        "(default ablation_config.strategy, itself one_at_a_time)",
    )  # fmt: skip
    parser.add_argument(
        "--tokens", type=tokens, default=None, metavar="N",
        help="training tokens per run (sets train_config.max_tokens; default ablation_config.tokens_per_run, "
        "0 = the base config's length)",
    )  # fmt: skip
    parser.add_argument(
        "--gpus", type=int, default=1, metavar="G",
        help="runs trained at once, each on its own GPU via CUDA_VISIBLE_DEVICES (default 1: one after another)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the study in --output-dir: skip finished runs, resume interrupted ones from their latest "
        "checkpoint, retry failed ones (takes no planning flag)",
    )  # fmt: skip
    parser.add_argument(
        "--custom-datasets", default=None, metavar="FILE",
        help="datasets file (mixes: name -> sources) whose every mix is a data_mix variant",
    )  # fmt: skip
    parser.add_argument(
        "--dry-run", action="store_true", help="plan and validate every run, print the plan, train nothing"
    )
    args = parser.parse_args(argv)
    try:
        return ablate(
            args.base_config, args.overrides, args.output_dir, args.axes, args.strategy, args.tokens,
            args.gpus, args.resume, args.custom_datasets, args.dry_run,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:  # ConfigError and AblationError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
