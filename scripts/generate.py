#!/usr/bin/env python
"""Sample text from a trained checkpoint.

    python scripts/generate.py --checkpoint runs/tiny --prompt "The" --prompt "Once" --max-new-tokens 64

--checkpoint takes a checkpoint folder (runs/NAME/checkpoints/step_XXXXXXXX) or a run directory (its
latest complete checkpoint). The model decodes over its latent KV cache and stops at EOS.
"""

from __future__ import annotations

import argparse
import sys

from llm.config import ConfigError


def available_device(text: str) -> str:
    """argparse type for --device: a torch device string this machine has (else a one-line error)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1): {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run directory (latest checkpoint)")
    parser.add_argument(
        "--prompt", dest="prompts", action="append", default=None,
        help="text to continue (repeatable; prompts are decoded as a batch); default: one empty prompt",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens sampled per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 = off (default 50)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1.0 = off (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="cpu", type=available_device,
                        help="torch device to run on, e.g. cpu or cuda (default cpu)")  # fmt: skip
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (no KV cache)")
    args = parser.parse_args(argv)
    from llm.models.generation import generate_text
    from llm.training.checkpoint import CheckpointError

    try:
        texts = generate_text(
            args.checkpoint, args.prompts or [""], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
            args.seed, args.device, not args.no_cache,
        )
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for text in texts:
        print(text)
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
