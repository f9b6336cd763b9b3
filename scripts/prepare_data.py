#!/usr/bin/env python
"""Tokenise a dataset mix into binary token shards (uint16/uint32) with an index, for the memmap loader.

    python scripts/prepare_data.py --config configs/config.yaml --output data/web_mix --max-tokens 1000000000
    python scripts/prepare_data.py --config configs/tiny.yaml --output /tmp/embedded --max-tokens 2000000

Then train with ``--set dataset_config.pretokenized_dir=<output>`` (the tokenizer must be the same one;
it is saved under <output>/tokenizer).
"""

from __future__ import annotations

import argparse
import sys

from llm.config import load_config
from llm.config.cli import add_config_arguments
from llm.data.pretokenized import prepare_pretokenized
from llm.data.tokenizer import build_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "YAML config whose dataset_config names the mix and tokenizer", "dataset_config.mix=web_only")
    parser.add_argument("--output", required=True, help="directory for index.json, tokenizer/, train/ and validation/ shards")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="stop the train split after this many tokens (0 = one full pass; required for the embedded mix)")
    parser.add_argument("--shard-tokens", type=int, default=2**27, help="tokens per shard file (default 134217728)")
    parser.add_argument("--no-validation", action="store_true", help="skip the sources' validation splits")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.shard_tokens < 1:
            raise ValueError(f"--shard-tokens: got {args.shard_tokens}; must be >= 1")
        tokenizer = build_tokenizer(config.dataset_config)
        index = prepare_pretokenized(config.dataset_config, tokenizer, args.output, args.max_tokens,
                                     args.shard_tokens, validation=not args.no_validation)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train = sum(s["tokens"] for s in index["train"])
    val = sum(s["tokens"] for s in index["validation"])
    print(f"wrote {args.output}: {train} train tokens in {len(index['train'])} shard(s), {val} validation tokens, "
          f"{index['bad_records']} bad records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
