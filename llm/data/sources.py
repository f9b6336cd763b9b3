"""Sources of documents: named mixes, local files, hub datasets, the embedded corpus.

Every source becomes a stream of records ``{"text": str | None, "source": int}``; ``text`` is None
for a record that could not be used (malformed JSON, not UTF-8, missing or non-string field). Bad
records travel on to the packer, which counts them against ``max_bad_records``, so one broken line in
a 100 GB dump costs a warning, not the run.

Local files are read by our own generator wrapped in ``datasets.IterableDataset.from_generator``
(one shard per file) instead of the ``json`` builder, because the builder stops the whole stream at
the first malformed line. Hub datasets go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.config.defaults import DatasetConfig, DataSourceConfig
from llm.config.errors import ConfigError
from llm.data.embedded import VALIDATION_DOCUMENTS, embedded_documents

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


# ---------------------------------------------------------------------------------------------
# Mixes
# ---------------------------------------------------------------------------------------------


def resolve_sources(cfg: DatasetConfig) -> list[DataSourceConfig]:
    """The sources of ``cfg``: inline ``sources`` when given, else the named ``mix`` of ``datasets_file``."""
    if cfg.sources:
        sources, where = list(cfg.sources), "dataset_config.sources"
    else:
        sources, where = load_mix(cfg.datasets_file, cfg.mix), f"{cfg.datasets_file}: mixes.{cfg.mix}"
    names = [s.name or f"source{i}" for i, s in enumerate(sources)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: source names must be unique, got {names}")
    for s, name in zip(sources, names, strict=True):
        s.name = name
    return sources


def load_mix(datasets_file: str, mix: str) -> list[DataSourceConfig]:
    """Read mix ``mix`` from the YAML file: ``mixes: {name: [source, ...]}``."""
    from llm.config.loader import from_dict, read_yaml_mapping
    from llm.config.validation import validate_data_source

    if not Path(datasets_file).is_file():
        if mix == "embedded":  # the default must work from any directory, even without configs/
            return [DataSourceConfig(name="embedded", type="embedded")]
        raise ConfigError(
            f"dataset_config.datasets_file: {datasets_file!r} does not exist (a relative path is read from the "
            f"working directory, {Path.cwd()})"
        )
    mixes = read_yaml_mapping(datasets_file).get("mixes")
    if not isinstance(mixes, dict):
        raise ConfigError(f"{datasets_file}: needs a top-level 'mixes' mapping of mix name -> list of sources")
    if mix not in mixes:
        raise ConfigError(f"dataset_config.mix: got {mix!r}; {datasets_file} defines: {', '.join(sorted(mixes))}")
    entries = mixes[mix]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{datasets_file}: mixes.{mix} must be a non-empty list of sources")
    sources = []
    for i, entry in enumerate(entries):
        key = f"{datasets_file}: mixes.{mix}[{i}]"
        src = from_dict(DataSourceConfig, entry, prefix=key)
        validate_data_source(src, key)  # the same checks as an inline source
        sources.append(src)
    return sources


def normalized_weights(sources: list[DataSourceConfig]) -> list[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


# ---------------------------------------------------------------------------------------------
# Records -> text
# ---------------------------------------------------------------------------------------------


def format_record(record: Any, text_field: str, template: str | None, min_chars: int, max_chars: int) -> str | None:
    """The document text of one record, "" when a length filter drops it, None when it is unusable."""
    if not isinstance(record, dict):
        return None
    try:
        text = template.format_map(record) if template else record[text_field]
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):  # a record the template does not fit
        return None
    if not isinstance(text, str):
        return None
    if len(text) < min_chars or (max_chars and len(text) > max_chars):
        return ""
    return text


def check_first_record(src: DataSourceConfig, record: dict, where: str) -> None:
    """A source whose first record lacks the text field is a configuration error, not a bad record."""
    if src.template:
        try:
            src.template.format_map(record)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"{where}: template {src.template!r} does not fit the records ({e!r}); fields: {sorted(record)}") from None
    elif src.text_field not in record:
        raise ValueError(f"{where}: records have no field {src.text_field!r} (fields: {', '.join(sorted(record))}); set text_field or template")


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def _kind(path: str) -> str:
    """The format of ``path`` from its suffix, ignoring a compression suffix (``a.jsonl.gz`` -> .jsonl)."""
    p = Path(path)
    suffixes = p.suffixes[-2:] if p.suffix in _COMPRESSED else p.suffixes[-1:]
    return suffixes[0] if suffixes else ""


def local_files(src: DataSourceConfig, split: str) -> list[str]:
    """Sorted files of a local source. The validation split is ``validation_split`` read as a path/glob."""
    pattern = src.path if split == "train" else src.validation_split
    where = f"source {src.name!r}"
    if not pattern:
        raise ValueError(f"{where}: no {split} split configured")
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"{where}: no file matches {pattern!r}")
    bad = [f for f in files if _kind(f) not in LOCAL_SUFFIXES or not os.path.isfile(f)]
    if bad:
        raise ValueError(f"{where}: {bad[0]!r} is not a {'/'.join(LOCAL_SUFFIXES)} file (optionally .gz/.bz2/.xz)")
    return files


def _open_bytes(path: str) -> io.BufferedIOBase:
    opener = _COMPRESSED.get(Path(path).suffix, open)
    return opener(path, "rb")


def iter_file_records(path: str, sample_by: str = "paragraph") -> Iterator[dict | None]:
    """Records of one local file; None for a line that is not UTF-8 or not valid JSON.

    A file that cannot be decoded at all (a truncated or corrupt archive, not a parquet file) raises a
    ``ValueError`` naming it, whenever in the file the damage is met.
    """
    try:
        yield from _file_records(path, sample_by)
    except FileNotFoundError:
        raise
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read the file, it is corrupt or truncated ({type(e).__name__}: {e})") from None


def _file_records(path: str, sample_by: str) -> Iterator[dict | None]:
    kind = _kind(path)
    if kind == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=256)
            for batch in batches:
                yield from batch.to_pylist()
        except pyarrow.ArrowException as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        return
    with _open_bytes(path) as f:
        if kind == ".txt":
            yield from _txt_records(f, sample_by)
            return
        first = f.peek(1)[:1] if hasattr(f, "peek") else b""
        if kind == ".json" and first == b"[":
            try:
                records = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a valid JSON array ({e})") from None
            yield from records
            return
        for line in f:  # JSON lines (.jsonl, or .json not starting with '[')
            if not line.strip():
                continue
            try:
                yield json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield None


def _txt_records(f: io.BufferedIOBase, sample_by: str) -> Iterator[dict | None]:
    def decode(raw: bytes) -> dict | None:
        try:
            return {"text": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return None

    if sample_by == "document":
        yield decode(f.read())
        return
    paragraph: list[bytes] = []
    for line in f:
        if sample_by == "line":
            if line.strip():
                yield decode(line.rstrip(b"\r\n"))
        elif line.strip():
            paragraph.append(line)
        elif paragraph:
            yield decode(b"".join(paragraph).rstrip(b"\r\n"))
            paragraph = []
    if paragraph:
        yield decode(b"".join(paragraph).rstrip(b"\r\n"))


def _local_generator(files: list[str], source: int, text_field: str, template: str | None, min_chars: int,
                     max_chars: int, sample_by: str) -> Iterator[dict]:
    # Module-level (picklable) generator for IterableDataset.from_generator; ``files`` is its shard list.
    for path in files:
        for record in iter_file_records(path, sample_by):
            text = format_record(record, text_field, template, min_chars, max_chars)
            if text != "":
                yield {"text": text, "source": source}


def _embedded_generator(starts: list[int], source: int, seed: int, split: str, step: int) -> Iterator[dict]:
    for start in starts:
        for text in embedded_documents(seed, split, start=start, step=step):
            yield {"text": text, "source": source}


# ---------------------------------------------------------------------------------------------
# Per source: an HF IterableDataset, or plain iteration (validation, tokenizer training)
# ---------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def source_problem(src: DataSourceConfig, check_hub: bool = True) -> str | None:
    """Why ``src`` cannot be had on this machine, found without reading it: a hub dataset streamed while
    the hub is off (``check_hub``), or a local train/validation pattern that matches no file. None when
    it looks usable."""
    if check_hub and src.type == "hub" and src.streaming and hub_offline():
        return (
            f"source {src.name!r}: hub dataset {src.path!r} cannot be streamed while HF_HUB_OFFLINE=1 "
            "(or HF_DATASETS_OFFLINE=1); unset it, or use a local source / pretokenized_dir"
        )
    if src.type == "local":
        for pattern in (src.path, src.validation_split):
            if pattern and not glob.glob(os.path.expanduser(pattern), recursive=True):
                return f"source {src.name!r}: no file matches {pattern!r}"
    return None


def check_sources_reachable(cfg: DatasetConfig) -> None:
    """Fail in well under a second, before any run starts, on a source that cannot be had
    (``source_problem``); a config that trains from ``pretokenized_dir`` reads no source."""
    if cfg.pretokenized_dir:
        return
    for src in resolve_sources(cfg):
        _require_usable(src)


def _require_usable(src: DataSourceConfig) -> None:
    problem = source_problem(src)
    if problem:
        raise ValueError(problem)


def _load_hub(src: DataSourceConfig, split_name: str):
    _require_usable(src)  # before importing `datasets`: an immediate error (< 2 s), not a retry loop
    import datasets

    try:
        ds = datasets.load_dataset(src.path, name=src.config_name, split=split_name, revision=src.revision,
                                   streaming=src.streaming)
    except Exception as e:  # many hub/builder error types; all are "this source cannot be opened"
        hint = " (HF_HUB_OFFLINE=1 is set: only cached datasets load)" if hub_offline() else ""
        raise ValueError(f"source {src.name!r}: cannot load hub dataset {src.path!r} split {split_name!r}{hint}: {e}") from None
    if not src.streaming:
        ds = ds.to_iterable_dataset(num_shards=min(64, max(1, len(ds))))
    columns = ds.column_names
    if columns is not None and not src.template and src.text_field not in columns:
        raise ValueError(f"source {src.name!r}: hub dataset {src.path!r} has no field {src.text_field!r} (fields: {', '.join(columns)})")
    return ds


def _features():
    from datasets import Features, Value

    return Features({"text": Value("string"), "source": Value("int64")})


def _hub_to_text(record: dict, source: int, text_field: str, template: str | None, min_chars: int, max_chars: int) -> dict:
    return {"text": format_record(record, text_field, template, min_chars, max_chars), "source": source}


def _kept(record: dict) -> bool:
    return record["text"] != ""  # "" = dropped by a length filter; None (bad) goes on to be counted


def source_dataset(src: DataSourceConfig, index: int, split: str, seed: int, node: int, num_nodes: int):
    """This node's share of one source as an HF IterableDataset of ``{"text", "source"}`` records."""
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if src.type == "embedded":
        # One infinite shard per node: node k reads documents k, k + num_nodes, ...
        ds = IterableDataset.from_generator(
            _embedded_generator, features=_features(),
            gen_kwargs={"starts": list(range(num_nodes)), "source": index, "seed": seed, "split": split, "step": num_nodes},
        )
        return split_dataset_by_node(ds, node, num_nodes)
    if src.type == "local":
        files = local_files(src, split)
        check_local_source(src, files)
        ds = IterableDataset.from_generator(
            _local_generator, features=_features(),
            gen_kwargs={"files": files, "source": index, "text_field": src.text_field, "template": src.template,
                        "min_chars": src.min_chars, "max_chars": src.max_chars, "sample_by": src.sample_by},
        )
    else:
        split_name = src.split if split == "train" else src.validation_split
        ds = _load_hub(src, split_name)
        ds = ds.map(_hub_to_text, fn_kwargs={"source": index, "text_field": src.text_field, "template": src.template,
                                             "min_chars": src.min_chars, "max_chars": src.max_chars},
                    remove_columns=ds.column_names, features=_features())
        ds = ds.filter(_kept)
    if split == "train" and src.holdout_documents:
        # Exclusion by content, not position: exact whatever the sharding across nodes and workers.
        ds = ds.filter(_not_held_out, fn_kwargs={"held_out": held_out_hashes(src)})
    return split_dataset_by_node(ds, node, num_nodes)


def check_local_source(src: DataSourceConfig, files: list[str]) -> None:
    """Fail early on a source with no records or whose records lack the text field."""
    for path in files:
        for record in iter_file_records(path, src.sample_by):
            if isinstance(record, dict):
                check_first_record(src, record, f"source {src.name!r} ({path})")
                return
    raise ValueError(f"source {src.name!r}: no readable records in {len(files)} file(s) matching {src.path!r}")


def iter_source_texts(src: DataSourceConfig, split: str, seed: int = 0) -> Iterator[str | None]:
    """All documents of one source and split, in order, without HF machinery (validation, tokenizer training).

    Finite for every split except the embedded train split.
    """
    if src.type == "embedded":
        stop = VALIDATION_DOCUMENTS if split == "validation" else None
        yield from embedded_documents(seed, split, stop=stop)
        return
    if split == "validation" and src.holdout_documents:
        yield from itertools.islice(_source_texts(src, "train"), src.holdout_documents)
    elif split == "train" and src.holdout_documents:
        held_out = held_out_hashes(src)
        yield from (t for t in _source_texts(src, "train") if t is None or _text_hash(t) not in held_out)
    else:
        yield from _source_texts(src, split)


def _text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def held_out_hashes(src: DataSourceConfig) -> frozenset[str]:
    """Content hashes of the first ``holdout_documents`` documents of a source's training split.

    They form the source's validation split; training skips every document with one of these texts
    (repeats later in the stream included), so train and validation never share a document.
    """
    return _held_out_hashes(dataclasses.astuple(src))  # config dataclasses are unhashable; tuples are


@functools.lru_cache(maxsize=64)  # read once per process, not once per loader or evaluation
def _held_out_hashes(fields: tuple) -> frozenset[str]:
    src = DataSourceConfig(*fields)
    first = itertools.islice(_source_texts(src, "train"), src.holdout_documents)
    return frozenset(_text_hash(t) for t in first if t is not None)


def _not_held_out(record: dict, held_out: frozenset[str]) -> bool:
    return record["text"] is None or _text_hash(record["text"]) not in held_out


def _source_texts(src: DataSourceConfig, split: str) -> Iterator[str | None]:
    """Documents of a local or hub source's own split (``validation`` = its ``validation_split``)."""
    if src.type == "local":
        files = local_files(src, split)
        check_local_source(src, files)
        for path in files:
            for record in iter_file_records(path, src.sample_by):
                text = format_record(record, src.text_field, src.template, src.min_chars, src.max_chars)
                if text != "":
                    yield text
        return
    ds = _load_hub(src, src.split if split == "train" else src.validation_split)
    for record in ds:
        text = format_record(record, src.text_field, src.template, src.min_chars, src.max_chars)
        if text != "":
            yield text


def has_split(src: DataSourceConfig, split: str) -> bool:
    return split == "train" or src.type == "embedded" or bool(src.validation_split) or src.holdout_documents > 0


_DONE = object()  # end of a source's stream (None is a bad record)


def validation_texts(sources: list[DataSourceConfig], seed: int = 0, only: str | None = None) -> Iterator[tuple[int, str | None]]:
    """(source index, text or None for a bad record) of every source's validation split, one document
    from each source in turn (a source that runs out drops out): an evaluation capped at ``eval_batches``
    then scores every source, not only the first ones. ``only`` keeps the source of that name."""
    streams = {
        i: iter_source_texts(src, "validation", seed)
        for i, src in enumerate(sources)
        if (only is None or src.name == only) and has_split(src, "validation")
    }
    while streams:
        for i in list(streams):
            text = next(streams[i], _DONE)
            if text is _DONE:
                del streams[i]
            else:
                yield i, text

