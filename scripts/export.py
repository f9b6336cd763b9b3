#!/usr/bin/env python
"""Export a trained checkpoint: the native format (any model) or Hugging Face DeepseekV3 (all-dense models).

    python scripts/export.py --checkpoint runs/tiny --output exports/tiny                 # native
    python scripts/export.py --checkpoint runs/dense/checkpoints/step_00001000 --output exports/hf --format hf

native: model.safetensors + config.json, read back by FoundationModel.from_pretrained(DIR).
hf:     transformers.AutoModelForCausalLM.from_pretrained(DIR) loads it (DeepseekV3 has no PEER layer,
        so every FFN must be dense: model_config.peer_every_n=0 or peer_layers=[]).
"""

from __future__ import annotations

import argparse
import sys

from llm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run directory (latest checkpoint)")
    parser.add_argument("--output", required=True, help="directory to write (created if missing)")
    parser.add_argument(
        "--format", choices=["native", "hf"], default="native",
        help="native (safetensors + config.json, any model) or hf (Hugging Face DeepseekV3, all-dense models)",
    )
    args = parser.parse_args(argv)
    from llm.models.hf_export import export_checkpoint
    from llm.training.checkpoint import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, args.output, args.format)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
