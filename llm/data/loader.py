"""Resumable, distributed training and validation loaders.

Sharding: the data is split over ``world_size * max(1, num_workers)`` logical workers ("nodes" in
``datasets.distributed.split_dataset_by_node``); rank r's worker w is node ``r * W + w``. Each logical
worker owns its document stream, tokeniser and packer, and attaches its state to every batch it
yields, so the state saved with a checkpoint is exact even though workers prefetch ahead. Batches are
taken from the workers round-robin (torch's DataLoader order); on resume the worker that was next
becomes DataLoader worker 0. Resuming needs the same world size, num_workers and mix.

Equal batches on every rank: a training stream never ends (each exhausted pass over the mix starts
a new epoch, reseeded), so every rank yields a batch at every step whatever the sources' sizes and
collectives cannot hang on a rank that ran dry. Validation is finite: every rank reads the whole
held-out stream and takes batches ``rank, rank + world_size, ...`` of it, completed rounds only.

Shuffling: ``shuffle_buffer > 0`` adds an HF shuffle buffer, whose contents are not saved, so resume
is then approximate (the stream continues from the right position, but the buffer refills). The
default 0 keeps resume exact; the memmap path shuffles sequences exactly (``pretokenized.py``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llm.config.defaults import DatasetConfig, DataSourceConfig
from llm.config.errors import ConfigError
from llm.config.validation import validate_dataset_config
from llm.data.embedded import embedded_document
from llm.data.packing import Packer
from llm.data.sources import (
    normalized_weights,
    resolve_sources,
    source_dataset,
    validation_texts,
)
from llm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


STATE_VERSION = 1
_ENCODE_CHUNK = 16  # documents tokenised per encode_batch call (Rust parallelises within a call)


@dataclass
class LoaderPlan:
    """Everything a logical worker needs to rebuild its stream (picklable, sent to DataLoader workers)."""

    cfg: DatasetConfig
    tokenizer: Tokenizer
    sources: list[DataSourceConfig]
    batch_size: int
    rank: int
    world_size: int

    @property
    def num_logical(self) -> int:
        return max(1, self.cfg.num_workers)

    def node(self, logical: int) -> tuple[int, int]:
        return self.rank * self.num_logical + logical, self.world_size * self.num_logical


# ---------------------------------------------------------------------------------------------
# Document streams: (source index, text | None) forever, with a state
# ---------------------------------------------------------------------------------------------


class EmbeddedStream:
    """The embedded corpus alone: node k reads documents k, k + num_nodes, ... (O(1) resume)."""

    def __init__(self, seed: int, node: int, num_nodes: int, state: dict | None):
        self.seed, self.node, self.num_nodes = seed, node, num_nodes
        self.k = 0 if state is None else int(state["k"])

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        while True:
            text = embedded_document(self.seed, "train", self.node + self.k * self.num_nodes)
            self.k += 1
            yield 0, text

    def state_dict(self) -> dict:
        return {"k": self.k}


class MixStream:
    """Sources interleaved by ``datasets.interleave_datasets`` with normalised weights; endless epochs."""

    def __init__(self, plan: LoaderPlan, node: int, num_nodes: int, state: dict | None, max_epochs: int | None = None):
        self.plan, self.node, self.num_nodes, self.max_epochs = plan, node, num_nodes, max_epochs
        self.epoch = 0 if state is None else int(state["epoch"])
        self._resume = None if state is None else state["hf"]
        self._ds = None

    def _build(self):
        import datasets

        cfg = self.plan.cfg
        parts = [source_dataset(s, i, "train", cfg.seed, self.node, self.num_nodes) for i, s in enumerate(self.plan.sources)]
        ds = datasets.interleave_datasets(
            parts, probabilities=normalized_weights(self.plan.sources), seed=cfg.seed + self.epoch,
            stopping_strategy=cfg.stopping_strategy,
        )
        if cfg.shuffle_buffer > 0:
            ds = ds.shuffle(seed=cfg.seed + self.epoch, buffer_size=cfg.shuffle_buffer)
        return ds

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        while self.max_epochs is None or self.epoch < self.max_epochs:
            if self.epoch > 0 and self.plan.cfg.stopping_strategy == "first_exhausted" and len(self.plan.sources) > 1:
                _warn_once(
                    "dataset_config.stopping_strategy first_exhausted: an epoch of the mix ended when its "
                    "smallest source ran out, and every epoch restarts each source from its beginning, so "
                    "documents of larger sources past that point are never reached; all_exhausted trains on "
                    "all of them"
                )
            ds = self._build()
            resumed = self._resume is not None
            if resumed:
                ds.load_state_dict(self._resume)
                self._resume = None
            self._ds = ds
            count = 0
            for record in ds:
                count += 1
                yield record["source"], record["text"]
            if count == 0 and not resumed:
                raise ValueError(
                    f"data node {self.node} of {self.num_nodes} got no documents from the mix "
                    f"({', '.join(s.name for s in self.plan.sources)}); the sources are too small for "
                    "world_size x num_workers, or empty"
                )
            self.epoch += 1
            self._ds = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "hf": None if self._ds is None else self._ds.state_dict()}


# ---------------------------------------------------------------------------------------------
# One logical worker: documents -> tokens -> packed batches, each with the state after it
# ---------------------------------------------------------------------------------------------


class BadRecordCounter:
    def __init__(self, cap: int, count: int = 0):
        self.cap, self.count = cap, count

    def add(self, where: str) -> None:
        self.count += 1
        if self.count == 1:
            log.warning("%s: skipped a malformed record (bad JSON/UTF-8 or missing text); further ones are counted", where)
        if self.count > self.cap:
            raise ValueError(f"{where}: {self.count} malformed records exceed dataset_config.max_bad_records={self.cap}")


def packed_batches(plan: LoaderPlan, logical: int, state: dict | None) -> Iterator[tuple[dict, dict]]:
    """Yield ``(batch, state_after_batch)`` forever for one logical worker."""
    cfg, tok = plan.cfg, plan.tokenizer
    node, num_nodes = plan.node(logical)
    only_embedded = len(plan.sources) == 1 and plan.sources[0].type == "embedded"
    stream_state = None if state is None else state["stream"]
    stream = (EmbeddedStream(cfg.seed, node, num_nodes, stream_state) if only_embedded
              else MixStream(plan, node, num_nodes, stream_state))
    packer = Packer(cfg.seq_len, tok.eos_id, tok.bos_id, tok.pad_id, cfg.add_bos, len(plan.sources))
    bad = BadRecordCounter(cfg.max_bad_records, 0 if state is None else int(state["bad_records"]))
    if state is not None:
        packer.load_state_dict(state["packer"])
    docs = iter(stream)
    while True:
        while packer.available() < plan.batch_size:
            chunk = []
            while len(chunk) < _ENCODE_CHUNK:
                source, text = next(docs)
                if text is None:
                    bad.add(f"source {plan.sources[source].name!r}")
                else:
                    chunk.append((source, text))
            for (source, _), ids in zip(chunk, tok.encode_batch([t for _, t in chunk]), strict=True):
                packer.add(ids, source)
        batch = packer.take(plan.batch_size)
        yield batch, {"stream": stream.state_dict(), "packer": packer.state_dict(), "bad_records": bad.count}


def _worker_batches(plan: LoaderPlan, logical: int, state: dict | None) -> Iterator[tuple[dict, dict]]:
    if plan.cfg.pretokenized_dir:
        from llm.data.pretokenized import memmap_batches

        return memmap_batches(plan, logical, state)
    return packed_batches(plan, logical, state)


class _WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker w runs logical worker ``(w + offset) % W`` from its saved state."""

    def __init__(self, plan: LoaderPlan, states: list[dict | None], offset: int):
        self.plan, self.states, self.offset = plan, states, offset

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None:
            # HF IterableDatasets shard themselves again by DataLoader worker when they see one, which
            # would split our already per-worker stream a second time (and starve workers of small
            # sources). Sharding is ours (split_dataset_by_node), so hide the worker from them.
            torch.utils.data._utils.worker._worker_info = None
        logical = (worker + self.offset) % self.plan.num_logical
        for batch, state in _worker_batches(self.plan, logical, self.states[logical]):
            yield logical, batch, state


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------


def _unwrap_worker_error(error: Exception) -> Exception:
    """A data error raised in a DataLoader worker, as the worker raised it: torch re-raises it with the
    worker's whole traceback as its message, which scripts would print after ``error:``."""
    text = str(error)
    if "DataLoader worker process" not in text:
        return error
    last = text.strip().splitlines()[-1]  # "ValueError: <the original one-line message>"
    return type(error)(last.split(": ", 1)[1] if ": " in last else last)


class TrainLoader:
    """Endless iterable of batches ``{"input_ids", "labels", "doc_ids"}``, each (B, S) int64.

    ``iter()`` always continues from the state after the last batch it yielded, so
    ``load_state_dict`` followed by iteration reproduces an uninterrupted run exactly.
    """

    def __init__(self, plan: LoaderPlan):
        self.plan = plan
        self.states: list[dict | None] = [None] * plan.num_logical
        self.next_worker = 0
        self.batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset = _WorkerDataset(self.plan, list(self.states), self.next_worker)
        nw = self.plan.cfg.num_workers
        if nw == 0:
            items: Any = iter(dataset)
        else:
            items = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=nw,
                                                prefetch_factor=self.plan.cfg.prefetch_factor)
        try:
            for logical, batch, state in items:
                self.states[logical] = state
                self.next_worker = (logical + 1) % self.plan.num_logical
                self.batches += 1
                yield batch
        except (ValueError, FileNotFoundError) as e:
            raise _unwrap_worker_error(e) from None


    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION, "rank": self.plan.rank, "world_size": self.plan.world_size,
            "num_logical_workers": self.plan.num_logical, "next_worker": self.next_worker,
            "batches": self.batches, "workers": list(self.states),
        }

    def load_state_dict(self, state: dict) -> None:
        settings = (
            ("world_size", self.plan.world_size, "the number of processes"),
            ("num_logical_workers", self.plan.num_logical, "dataset_config.num_workers (0 and 1 are equivalent)"),
        )
        for key, mine, what in settings:
            if state.get(key) != mine:
                raise ValueError(
                    f"data loader state was saved with {key}={state.get(key)}, now {mine}; resume with the same {what}"
                )
        self.states = list(state["workers"])
        self.next_worker = int(state["next_worker"])
        self.batches = int(state["batches"])

    def source_token_counts(self) -> dict[str, int]:
        """Tokens delivered so far by this rank, per source name (for logging the achieved mix)."""
        totals = [0] * len(self.plan.sources)
        for state in self.states:
            if state is not None and "packer" in state:
                totals = [a + b for a, b in zip(totals, state["packer"]["source_tokens"], strict=True)]
        return {s.name: n for s, n in zip(self.plan.sources, totals, strict=True)}

    def mix_report(self) -> dict[str, float]:
        """Flat metrics: ``data/<source>/requested``, the source's normalised weight (the probability that
        a document is drawn from it), and ``data/<source>/achieved``, its fraction of the tokens read so
        far: sources with longer documents achieve more tokens than their weight.

        ``achieved`` needs per-source token counts, which only on-the-fly tokenization keeps; pre-tokenized
        shards fixed their mix when they were written (``scripts/prepare_data.py`` reports it), so there
        only ``requested`` is reported.
        """
        counts = self.source_token_counts()
        total = sum(counts.values())
        out = {}
        for src, want in zip(self.plan.sources, normalized_weights(self.plan.sources), strict=True):
            out[f"data/{src.name}/requested"] = want
            if total:
                out[f"data/{src.name}/achieved"] = counts[src.name] / total
        return out


class ValLoader:
    """Finite held-out batches; every rank yields the same number (complete rounds of world_size)."""

    def __init__(self, plan: LoaderPlan, source: str | None = None):
        self.plan = plan
        self.source = source
        names = [s.name for s in plan.sources]
        if source is not None and source not in names:
            raise ValueError(f"validation source {source!r} is not in the mix ({', '.join(names)})")

    def _all_batches(self) -> Iterator[dict]:
        if self.plan.cfg.pretokenized_dir:
            from llm.data.pretokenized import memmap_val_batches

            yield from memmap_val_batches(self.plan)
            return
        cfg, tok, b = self.plan.cfg, self.plan.tokenizer, self.plan.batch_size
        packer = Packer(cfg.seq_len, tok.eos_id, tok.bos_id, tok.pad_id, cfg.add_bos, len(self.plan.sources))
        bad = BadRecordCounter(cfg.max_bad_records)
        for i, text in validation_texts(self.plan.sources, cfg.seed, self.source):
            if text is None:
                bad.add(f"source {self.plan.sources[i].name!r} (validation)")
                continue
            packer.add(tok.encode(text), i)
            while packer.available() >= b:
                yield packer.take(b)
        last = packer.take_padded(b)
        if last is not None:
            yield last

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = self.plan.rank, self.plan.world_size
        round_: list[dict] = []
        for batch in self._all_batches():
            round_.append(batch)
            if len(round_) == world:
                yield round_[rank]
                round_ = []


def _plan(dataset_config: DatasetConfig, tokenizer: Tokenizer, batch_size: int, rank: int, world_size: int) -> LoaderPlan:
    validate_dataset_config(dataset_config)
    if batch_size < 1:
        raise ConfigError(f"train_config.batch_size: got {batch_size}; must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if dataset_config.pretokenized_dir:
        from llm.data.pretokenized import check_tokenizer, index_sources, read_index

        check_tokenizer(read_index(dataset_config.pretokenized_dir), tokenizer, dataset_config.pretokenized_dir)
        sources = index_sources(dataset_config.pretokenized_dir)
    else:
        sources = resolve_sources(dataset_config)
    return LoaderPlan(dataset_config, tokenizer, sources, batch_size, rank, world_size)


def build_train_loader(dataset_config: DatasetConfig, tokenizer: Tokenizer, batch_size: int,
                       rank: int = 0, world_size: int = 1) -> TrainLoader:
    """Endless, resumable training batches for ``rank`` (see the module docstring)."""
    return TrainLoader(_plan(dataset_config, tokenizer, batch_size, rank, world_size))


def build_val_loader(dataset_config: DatasetConfig, tokenizer: Tokenizer, batch_size: int,
                     rank: int = 0, world_size: int = 1, source: str | None = None) -> ValLoader:
    """Finite held-out batches of every source with a validation split (or only ``source``)."""
    return ValLoader(_plan(dataset_config, tokenizer, batch_size, rank, world_size), source)
