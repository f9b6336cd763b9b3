"""Tokenizers: the embedded one (built in code, no download), a local ``tokenizer.json`` or a hub name.

Every path returns a :class:`Tokenizer` wrapping a Hugging Face ``tokenizers.Tokenizer`` (fast, Rust,
picklable for DataLoader workers) with the special-token ids the packer needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from llm.config.defaults import DatasetConfig
from llm.data.embedded import embedded_documents
from llm.data.sources import hub_offline  # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE: either means no network

SPECIAL_TOKENS = ("<|eos|>", "<|bos|>", "<|pad|>")  # ids 0, 1, 2 in tokenizers trained here
EMBEDDED_VOCAB_SIZE = 512  # the embedded tokenizer's vocabulary (configs/tiny.yaml's vocab_size)
_EMBEDDED_TRAIN_DOCUMENTS = 2000  # documents of the embedded corpus the embedded BPE is trained on

# Names other tokenizers use for the same roles, searched in order when a tokenizer has no config.
_EOS_NAMES = ("<|eos|>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
_BOS_NAMES = ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of EOS, BOS and PAD.

    Tokens never get specials added by the wrapped tokenizer's post-processor: EOS/BOS placement is
    the packer's job (``llm/data/packing.py``), so ``encode`` is the plain text encoding.
    """

    def __init__(self, backend, eos_id: int, bos_id: int, pad_id: int, name: str = ""):
        self.backend = backend
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.name = name

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def vocab_fingerprint(self) -> str:
        """sha256 of the vocabulary (token -> id, added tokens included): equal for the same vocabulary."""
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once (the Rust side parallelises over them)."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (+ ``special_tokens.json`` with the role ids); returns the json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.json"
        self.backend.save(str(path))
        roles = {"eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id}
        (directory / "special_tokens.json").write_text(json.dumps(roles, indent=1) + "\n")
        return path


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a byte-level BPE (every byte is in the alphabet, so any text encodes) on ``texts``.

    The first three special tokens take the roles EOS, BOS, PAD (ids 0, 1, 2).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if len(special_tokens) < 3:
        raise ValueError(f"special_tokens: got {special_tokens!r}; need at least EOS, BOS and PAD (in that order)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size: got {vocab_size}; must be >= {len(alphabet) + len(special_tokens)} (bytes + specials)")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer=trainer)
    ids = [backend.token_to_id(t) for t in special_tokens[:3]]
    return Tokenizer(backend, *ids, name="bpe")


@functools.lru_cache(maxsize=2)
def embedded_tokenizer() -> Tokenizer:
    """The embedded default: a 512-token byte-level BPE trained (in ~1 s) on the embedded corpus.

    The corpus's lexicon is fixed (``llm/data/embedded.py``), so the same merges come out every time.
    """
    tok = train_bpe(embedded_documents(seed=0, split="train", stop=_EMBEDDED_TRAIN_DOCUMENTS), EMBEDDED_VOCAB_SIZE)
    tok.name = "embedded"
    return tok


def _role_ids(backend, directory: Path | None) -> tuple[int, int, int]:
    """EOS, BOS, PAD ids: from ``special_tokens.json`` or ``tokenizer_config.json`` beside the file, else by name."""
    if directory is not None and (directory / "special_tokens.json").is_file():
        roles = json.loads((directory / "special_tokens.json").read_text())
        return roles["eos_id"], roles["bos_id"], roles["pad_id"]
    configured: dict[str, str] = {}
    if directory is not None and (directory / "tokenizer_config.json").is_file():
        cfg = json.loads((directory / "tokenizer_config.json").read_text())
        for role in ("eos_token", "bos_token", "pad_token"):
            tok = cfg.get(role)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str):
                configured[role] = tok

    def find(role: str, names: tuple[str, ...]) -> int | None:
        for name in ([configured[role]] if role in configured else []) + list(names):
            tid = backend.token_to_id(name)
            if tid is not None:
                return tid
        return None

    eos = find("eos_token", _EOS_NAMES)
    if eos is None:
        raise ValueError("dataset_config.tokenizer: the tokenizer has no end-of-text token (looked for " + ", ".join(_EOS_NAMES) + ")")
    bos = find("bos_token", _BOS_NAMES)
    pad = find("pad_token", _PAD_NAMES)
    # GPT-2 style tokenizers have one special token for every role.
    return eos, eos if bos is None else bos, eos if pad is None else pad


def load_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    """A local ``tokenizer.json`` (or a directory holding one)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"dataset_config.tokenizer: no tokenizer file at {str(file)!r}")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or an unknown model
        raise ValueError(f"dataset_config.tokenizer: {str(file)!r} is not a valid tokenizer.json ({e})") from None
    return Tokenizer(backend, *_role_ids(backend, file.parent), name=str(path))


def load_hub_tokenizer(name: str) -> Tokenizer:
    """A hub repository's ``tokenizer.json`` (from the local cache when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if hub_offline():
        cached = try_to_load_from_cache(name, "tokenizer.json")
        if not isinstance(cached, str):
            raise ValueError(
                f"dataset_config.tokenizer: {name!r} is a hub tokenizer that is not in the local cache and "
                "HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) forbids downloading it; unset it, or use 'embedded' or "
                "a local tokenizer.json"
            )
        file = Path(cached)
    else:
        try:
            file = Path(hf_hub_download(name, "tokenizer.json"))
        except Exception as e:  # the hub raises several types; all mean "cannot get it"
            raise ValueError(f"dataset_config.tokenizer: cannot download tokenizer.json of {name!r}: {e}") from e
    for extra in ("tokenizer_config.json",):
        try:
            hf_hub_download(name, extra, local_files_only=hub_offline())
        except Exception:  # optional file: role ids then come from token names
            pass
    tok = load_tokenizer_file(file)
    tok.name = name
    return tok


def build_tokenizer(dataset_config: DatasetConfig) -> Tokenizer:
    """``dataset_config.tokenizer``: "embedded", a path to tokenizer.json (or its folder), or a hub name."""
    spec = dataset_config.tokenizer
    if spec == "embedded":
        return embedded_tokenizer()
    path = os.path.expanduser(spec)
    if os.path.exists(path) or _looks_like_path(spec):
        return load_tokenizer_file(path)  # a missing path is reported as one, never looked up on the hub
    return load_hub_tokenizer(spec)


def _looks_like_path(spec: str) -> bool:
    """True for what cannot be a hub id ("name" or "namespace/name"): a .json file, an absolute, home- or
    dot-relative path, a trailing separator, or more than one '/'."""
    return (
        spec.endswith(".json")
        or spec.startswith(("/", "~", "."))
        or spec.endswith(("/", os.sep))
        or spec.count("/") > 1
        or os.sep != "/" and os.sep in spec
    )


def train_tokenizer_on_mix(cfg: DatasetConfig, vocab_size: int, max_documents: int = 100_000,
                           special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Train a byte-level BPE on the first ``max_documents`` documents of the interleaved mix of ``cfg``."""
    from llm.data.loader import EmbeddedStream, LoaderPlan, MixStream
    from llm.data.sources import resolve_sources

    if max_documents < 1:
        raise ValueError(f"max_documents: got {max_documents}; must be >= 1")
    sources = resolve_sources(cfg)
    if len(sources) == 1 and sources[0].type == "embedded":
        stream = EmbeddedStream(cfg.seed, 0, 1, None)
    else:
        stream = MixStream(LoaderPlan(cfg, None, sources, 1, 0, 1), 0, 1, None, max_epochs=1)

    def texts():
        n = 0
        for _, text in stream:
            if text:  # skips malformed records (None); the loaders count them
                yield text
                n += 1
                if n >= max_documents:
                    return

    return train_bpe(texts(), vocab_size, special_tokens)
