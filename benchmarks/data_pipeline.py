#!/usr/bin/env python
"""Data pipeline throughput on CPU: on-the-fly tokenisation vs the pre-tokenised memmap path.

    python benchmarks/data_pipeline.py --corpus ../shared/corpus --seconds 20

Reads several gzip JSON-lines sources of the corpus directory interleaved by weight, with a byte-level
BPE of the reference vocabulary size (trained here on a corpus sample and cached under --work-dir,
because the reference's hub tokenizer cannot be downloaded offline), at the reference batch shape
(configs/config.yaml). Prepared shards and the tokenizer go to --work-dir (outside the project).
Prints one table; compare with the tokens/s one H100 consumes at the reference config.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SOURCES = {"brown": 1.0, "linux_docs": 2.0, "python_docs": 1.0, "sotu": 1.0, "kjv_bible": 0.5}  # name -> weight


def tokens_per_second(loader, seconds: float, warmup: int = 2) -> tuple[float, int]:
    """Batches drawn for ``seconds`` after ``warmup`` batches; returns (tokens/s, batches)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, tokens, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        tokens += batch["input_ids"].numel()
        n += 1
    return tokens / (time.perf_counter() - start), n


def h100_tokens_per_second(config_path: str, mfu: float = 0.4, peak: float = 989e12) -> tuple[float, int]:
    """Training tokens/s of one H100 at the reference config: peak bf16 x MFU / (6 x active params)."""
    from llm.config import load_config
    from llm.utils.eval.size import count_parameters

    report = count_parameters(load_config(config_path).model_config)
    # Non-embedding active parameters (the LM head included): the input embedding is a lookup, no FLOPs.
    return mfu * peak / (6 * report.active_non_embedding), report.active_non_embedding


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="../shared/corpus", help="directory of <source>.train.jsonl.gz files")
    parser.add_argument("--config", default="configs/config.yaml", help="reference config (batch shape, model size)")
    parser.add_argument("--work-dir", default="/tmp/data_pipeline_bench", help="where the tokenizer and shards are written")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement time per variant")
    parser.add_argument("--prepare-tokens", type=int, default=20_000_000, help="tokens written for the memmap path")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores the process may use")
    args = parser.parse_args(argv)

    os.sched_setaffinity(0, set(range(args.cores)))
    os.environ["RAYON_NUM_THREADS"] = str(args.cores)  # the tokenizers library's thread pool
    from llm.config import load_config
    from llm.config.defaults import DataSourceConfig
    from llm.data import build_train_loader
    from llm.data.pretokenized import prepare_pretokenized, read_index
    from llm.data.tokenizer import load_tokenizer_file, train_tokenizer_on_mix

    config = load_config(args.config)
    missing = [n for n in SOURCES if not (Path(args.corpus) / f"{n}.train.jsonl.gz").is_file()]
    if missing:
        print(f"error: {args.corpus} lacks {', '.join(f'{n}.train.jsonl.gz' for n in missing)}", file=sys.stderr)
        return 2
    cfg = config.dataset_config
    cfg.sources = [DataSourceConfig(name=n, type="local", path=str(Path(args.corpus) / f"{n}.train.jsonl.gz"), weight=w)
                   for n, w in SOURCES.items()]
    work = Path(args.work_dir)
    tok_dir = work / "tokenizer"
    vocab = min(config.model_config.vocab_size, 50257)
    if not (tok_dir / "tokenizer.json").is_file():
        t0 = time.perf_counter()
        train_tokenizer_on_mix(cfg, vocab, max_documents=1500).save(tok_dir)
        print(f"trained a {vocab}-token BPE in {time.perf_counter() - t0:.0f} s")
    tok = load_tokenizer_file(tok_dir)
    batch_size, seq = config.train_config.batch_size, cfg.seq_len

    rows = []
    for workers in (0, 1, 2):
        cfg.num_workers = workers
        tps, n = tokens_per_second(build_train_loader(cfg, tok, batch_size), args.seconds)
        rows.append((f"on-the-fly, num_workers={workers}", tps, n))
    prep = work / "shards"
    if not (prep / "index.json").is_file():
        cfg.num_workers = 0
        t0 = time.perf_counter()
        prepare_pretokenized(cfg, tok, prep, max_tokens=args.prepare_tokens, validation=False)
        print(f"prepared {args.prepare_tokens} tokens in {time.perf_counter() - t0:.0f} s")
    written = sum(s["tokens"] for s in read_index(prep)["train"])
    for workers in (0, 1):
        cfg.pretokenized_dir, cfg.num_workers = str(prep), workers
        tps, n = tokens_per_second(build_train_loader(cfg, tok, batch_size), args.seconds)
        rows.append((f"memmap ({written / 1e6:.0f} M tokens), num_workers={workers}", tps, n))

    need, active = h100_tokens_per_second(args.config)
    print(f"\nreference: B={batch_size} S={seq}, vocab {tok.vocab_size}, {len(SOURCES)} sources, {args.cores} cores; "
          f"one H100 needs {need / 1e3:.0f} k tokens/s (0.4 x 989 TFLOP/s / (6 x {active / 1e6:.1f} M active params))")
    print(f"| path | tokens/s | batches | feeds one H100 ({need / 1e3:.0f} k tok/s)? |")
    print("|---|---:|---:|---|")
    for name, tps, n in rows:
        print(f"| {name} | {tps / 1e3:,.0f} k | {n} | {'yes' if tps >= need else 'no'} ({tps / need:.2f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
