#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on a dataset mix and save it (tokenizer.json + special_tokens.json).

    python scripts/train_tokenizer.py --config configs/config.yaml --vocab-size 32000 --output tokenizers/web
    python scripts/train_tokenizer.py --config configs/tiny.yaml --set dataset_config.mix=embedded \\
        --vocab-size 1024 --max-documents 5000 --output /tmp/tok

Then set ``dataset_config.tokenizer: <output>`` to use it.
"""

from __future__ import annotations

import argparse
import sys

from llm.config import load_config
from llm.config.cli import add_config_arguments
from llm.data.tokenizer import SPECIAL_TOKENS, train_tokenizer_on_mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "YAML config whose dataset_config names the mix (see configs/)", "dataset_config.mix=web_only")
    parser.add_argument("--output", required=True, help="directory to write tokenizer.json and special_tokens.json into")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size including special tokens (default 32000)")
    parser.add_argument("--max-documents", type=int, default=100_000, help="documents of the mix to train on (default 100000)")
    parser.add_argument("--special-tokens", nargs="+", default=list(SPECIAL_TOKENS), metavar="TOKEN",
                        help="special tokens; the first three are EOS, BOS, PAD (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        tok = train_tokenizer_on_mix(config.dataset_config, args.vocab_size, args.max_documents, args.special_tokens)
        path = tok.save(args.output)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab {tok.vocab_size}, eos {tok.eos_id}, bos {tok.bos_id}, pad {tok.pad_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
