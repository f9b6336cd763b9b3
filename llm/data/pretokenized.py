"""Pre-tokenised token shards (written by ``scripts/prepare_data.py``) and their memmap loader.

Layout of a prepared directory::

    index.json                  dtype, vocab and special ids, tokenizer name, per-source token counts,
                                the shard lists of "train" and "validation"
    tokenizer/tokenizer.json    the tokenizer used (load it with dataset_config.tokenizer=<dir>/tokenizer)
    train/shard_00000.bin ...   flat token ids (uint16 when the vocabulary fits, else uint32);
    validation/shard_00000.bin  documents are separated by EOS, exactly as the packer lays them out

Training view: the train shards form one circular token stream of N tokens cut into
``n = ceil((N - 1) / S)`` windows of S + 1 tokens overlapping by one (the last wraps to the start), so
no token is dropped. Each epoch visits the windows in a seeded random order, which is exact to resume
(the state is one counter). Global sequence g goes to epoch ``g // n``; batch t of logical node k
holds sequences ``(t * nodes + k) * B + [0, B)``, so nodes are disjoint, cover the stream, and all
yield batches forever. ``doc_ids`` come from the EOS positions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llm.config.defaults import DatasetConfig, DataSourceConfig
from llm.data.packing import Packer
from llm.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llm.data.loader import LoaderPlan

INDEX_VERSION = 1
_WRITE_CHUNK = 64  # documents per encode_batch call while preparing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def read_index(directory: str | Path) -> dict:
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"dataset_config.pretokenized_dir: no index.json in {str(directory)!r}; run scripts/prepare_data.py")
    index = json.loads(path.read_text())
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {index.get('version')!r}, this code reads {INDEX_VERSION}")
    return index


def index_sources(directory: str | Path) -> list[DataSourceConfig]:
    """The prepared mix's sources (names and weights) for reports."""
    return [DataSourceConfig(name=s["name"], type="local", path=str(directory), weight=s["weight"]) for s in read_index(directory)["sources"]]


def check_tokenizer(index: dict, tokenizer: Tokenizer, where: str) -> None:
    """The shards' tokenizer and ``dataset_config.tokenizer`` must be the same: sizes and EOS first, then
    the vocabulary itself (two BPEs of one size share the ids of their specials but not their tokens)."""
    fix = f"set dataset_config.tokenizer to {where}/tokenizer"
    if tokenizer.vocab_size != index["vocab_size"] or tokenizer.eos_id != index["eos_id"]:
        raise ValueError(
            f"{where}: shards were written with a tokenizer of vocab {index['vocab_size']} / eos {index['eos_id']} "
            f"({index['tokenizer']!r}), but dataset_config.tokenizer gives vocab {tokenizer.vocab_size} / eos {tokenizer.eos_id}; "
            f"{fix}"
        )
    recorded = index.get("tokenizer_vocab_sha256")  # absent from indexes written before it was recorded
    if recorded and recorded != tokenizer.vocab_fingerprint():
        raise ValueError(
            f"{where}: shards were written with the tokenizer {index['tokenizer']!r}, whose vocabulary differs from "
            f"dataset_config.tokenizer ({tokenizer.name!r}) although both have {tokenizer.vocab_size} tokens; {fix}"
        )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class _ShardWriter:
    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._buf: list[np.ndarray] = []
        self._n = 0

    def write(self, ids: list[int]) -> None:
        self._buf.append(np.asarray(ids, dtype=self.dtype))
        self._n += len(ids)
        if self._n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        name = f"shard_{len(self.shards):05d}.bin"
        np.concatenate(self._buf).tofile(self.directory / name)
        self.shards.append({"file": f"{self.directory.name}/{name}", "tokens": self._n})
        self._buf, self._n = [], 0


def prepare_pretokenized(cfg: DatasetConfig, tokenizer: Tokenizer, output_dir: str | Path, max_tokens: int = 0,
                         shard_tokens: int = 2**27, validation: bool = True) -> dict:
    """Tokenise the mix of ``cfg`` into shards under ``output_dir``; returns the index.

    Train: one pass over the interleaved mix (``cfg.stopping_strategy``), stopped early after the
    document that reaches ``max_tokens`` (> 0; required for the endless embedded source). Validation: each source's held-out
    split, in source order.
    """
    from llm.data.loader import BadRecordCounter, EmbeddedStream, LoaderPlan, MixStream
    from llm.data.sources import resolve_sources, validation_texts

    sources = resolve_sources(cfg)
    only_embedded = len(sources) == 1 and sources[0].type == "embedded"
    if only_embedded and max_tokens <= 0:
        raise ValueError("max_tokens: the embedded source never ends; give a token budget > 0")
    out = Path(output_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    plan = LoaderPlan(cfg, tokenizer, sources, 1, 0, 1)
    stream = EmbeddedStream(cfg.seed, 0, 1, None) if only_embedded else MixStream(plan, 0, 1, None, max_epochs=1)
    bos = [tokenizer.bos_id] if cfg.add_bos else []
    counts = [0] * len(sources)
    bad = BadRecordCounter(cfg.max_bad_records)
    train = _ShardWriter(out / "train", dtype, shard_tokens)
    total = 0
    docs = iter(stream)
    while max_tokens <= 0 or total < max_tokens:
        chunk = []
        for source, text in docs:
            if text is None:
                bad.add(f"source {sources[source].name!r}")
                continue
            chunk.append((source, text))
            if len(chunk) == _WRITE_CHUNK:
                break
        if not chunk:
            break
        for (source, _), ids in zip(chunk, tokenizer.encode_batch([t for _, t in chunk]), strict=True):
            if 0 < max_tokens <= total:  # the budget ends after the document that reaches it
                break
            doc = bos + ids + [tokenizer.eos_id]
            train.write(doc)
            counts[source] += len(doc)
            total += len(doc)
    train.flush()
    val = _ShardWriter(out / "validation", dtype, shard_tokens)
    if validation:  # in the order the on-the-fly validation stream reads them
        for _, text in validation_texts(sources, cfg.seed):
            if text is not None:
                val.write(bos + tokenizer.encode(text) + [tokenizer.eos_id])
        val.flush()
    if not train.shards:
        raise ValueError(f"the mix produced no training tokens (sources: {', '.join(s.name for s in sources)})")
    tokenizer.save(out / "tokenizer")
    index = {
        "version": INDEX_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id, "tokenizer": tokenizer.name,
        "tokenizer_vocab_sha256": tokenizer.vocab_fingerprint(),
        "add_bos": cfg.add_bos, "bad_records": bad.count,
        "sources": [{"name": s.name, "weight": s.weight, "tokens": n} for s, n in zip(sources, counts, strict=True)],
        "train": train.shards, "validation": val.shards,
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class TokenStream:
    """The concatenation of shard files as one read-only array-like of token ids."""

    def __init__(self, directory: str | Path, shards: list[dict], dtype: str):
        self.arrays = [np.memmap(Path(directory) / s["file"], dtype=dtype, mode="r") for s in shards]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.size = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), wrapping around the end of the stream."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos = (start + filled) % self.size
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            offset = pos - int(self.starts[shard])
            take = min(length - filled, len(self.arrays[shard]) - offset)
            out[filled : filled + take] = self.arrays[shard][offset : offset + take]
            filled += take
        return out


def _docs_from_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Running document number: increments after every EOS (an EOS belongs to the document it ends)."""
    is_eos = (tokens == eos_id).to(torch.int64)
    return torch.cumsum(is_eos, 0) - is_eos


def memmap_batches(plan: LoaderPlan, logical: int, state: dict | None) -> Iterator[tuple[dict, dict]]:
    """Yield ``(batch, state_after_batch)`` forever for one logical worker (see the module docstring)."""
    cfg, b, s = plan.cfg, plan.batch_size, plan.cfg.seq_len
    index = read_index(cfg.pretokenized_dir)
    check_tokenizer(index, plan.tokenizer, cfg.pretokenized_dir)
    stream = TokenStream(cfg.pretokenized_dir, index["train"], index["dtype"])
    if stream.size < 2:
        raise ValueError(f"{cfg.pretokenized_dir}: the train shards hold fewer than 2 tokens")
    n_windows = -(-(stream.size - 1) // s)
    node, num_nodes = plan.node(logical)
    t = 0 if state is None else int(state["t"])
    perms: dict[int, torch.Tensor] = {}

    def window(seq: int) -> int:
        epoch, pos = divmod(seq, n_windows)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = torch.randperm(n_windows, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        return int(perms[epoch][pos])

    while True:
        first = (t * num_nodes + node) * b
        rows = [torch.from_numpy(stream.read(window(first + i) * s, s + 1)) for i in range(b)]
        tokens = torch.stack(rows)  # (B, S + 1)
        docs = torch.stack([_docs_from_eos(r, index["eos_id"]) for r in rows])
        batch = {
            "input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "doc_ids": (docs - docs[:, :1])[:, :-1].contiguous(),
        }
        t += 1
        yield batch, {"t": t}


_VAL_READ_TOKENS = 1 << 20  # validation tokens read per chunk


def memmap_val_batches(plan: LoaderPlan) -> Iterator[dict]:
    """The validation shards in order, packed and padded like the on-the-fly validation stream."""
    cfg, tok = plan.cfg, plan.tokenizer
    index = read_index(cfg.pretokenized_dir)
    check_tokenizer(index, tok, cfg.pretokenized_dir)
    if not index["validation"]:
        return
    stream = TokenStream(cfg.pretokenized_dir, index["validation"], index["dtype"])
    packer = Packer(cfg.seq_len, tok.eos_id, tok.bos_id, tok.pad_id, cfg.add_bos, 1)
    # Read in chunks: an evaluation usually stops after eval_batches, and a whole split as Python lists
    # would cost memory and time in proportion to its size.
    chunk = max(_VAL_READ_TOKENS, 4 * plan.batch_size * cfg.seq_len)
    first_doc = 0
    for start in range(0, stream.size, chunk):
        tokens = torch.from_numpy(stream.read(start, min(chunk, stream.size - start)).astype(np.int64))
        docs = _docs_from_eos(tokens, tok.eos_id) + first_doc  # a document may continue from the last chunk
        packer.tokens.extend(tokens.tolist())
        packer.docs.extend(docs.tolist())
        first_doc = int(docs[-1]) + int(tokens[-1] == tok.eos_id)
        while packer.available() >= plan.batch_size:
            yield packer.take(plan.batch_size)
    packer.next_doc = first_doc
    last = packer.take_padded(plan.batch_size)
    if last is not None:
        yield last
