import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from data_helpers import dataset_config

from llm.data.loader import build_train_loader, build_val_loader
from llm.data.packing import IGNORE_INDEX
from llm.data.pretokenized import TokenStream, prepare_pretokenized, read_index
from llm.data.sources import iter_source_texts
from llm.data.tokenizer import embedded_tokenizer

TOK = embedded_tokenizer()


@pytest.fixture
def prepared(two_sources, tmp_path):
    out = tmp_path / "prep"
    prepare_pretokenized(dataset_config(two_sources), TOK, out, shard_tokens=200)
    return out, two_sources


def test_shards_hold_every_document_with_eos(prepared):
    out, sources = prepared
    index = read_index(out)
    assert index["dtype"] == "uint16" and len(index["train"]) > 1
    tokens = TokenStream(out, index["train"], index["dtype"]).read(0, sum(s["tokens"] for s in index["train"]))
    texts = sorted(TOK.decode(d.tolist()) for d in np.split(tokens, np.where(tokens == TOK.eos_id)[0] + 1)[:-1])
    expected = sorted(t + "<|eos|>" for s in sources for t in iter_source_texts(s, "train"))
    # One pass of all_exhausted: every document at least once (the smaller source is oversampled).
    assert set(texts) == set(expected) and len(texts) > len(expected)
    assert {s["name"]: s["tokens"] > 0 for s in index["sources"]} == {"a": True, "b": True}


def test_memmap_resume_ranks_and_coverage(prepared):
    out, _ = prepared
    # Replace the train shards by distinct tokens so that every window is recognisable.
    index = read_index(out)
    np.arange(3, 403, dtype=np.uint16).tofile(out / "train" / "distinct.bin")
    index["train"] = [{"file": "train/distinct.bin", "tokens": 400}]
    (out / "index.json").write_text(json.dumps(index))
    cfg = dataset_config(pretokenized_dir=str(out))
    n_tokens = 400
    n_windows = -(-(n_tokens - 1) // cfg.seq_len)
    loaders = [build_train_loader(cfg, TOK, 2, rank=r, world_size=2) for r in range(2)]
    iters = [iter(x) for x in loaders]
    steps = n_windows // 4
    batches = [[next(it) for _ in range(steps)] for it in iters]
    # Both ranks together see each window of the epoch once: count every (S + 1)-token row.
    rows = {tuple(torch.cat([b["input_ids"][i], b["labels"][i, -1:]]).tolist()) for bs in batches for b in bs for i in range(2)}
    assert len(rows) == steps * 4
    assert all(r[0] in range(3, 403, cfg.seq_len) for r in rows)  # windows start every S tokens
    state = loaders[1].state_dict()
    expected = [next(iters[1]) for _ in range(5)]
    resumed = build_train_loader(cfg, TOK, 2, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(_save(state), weights_only=True))
    it = iter(resumed)
    got = [next(it) for _ in range(5)]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(expected, got, strict=True) for k in x)
    b = expected[0]
    steps_ = b["doc_ids"][:, 1:] - b["doc_ids"][:, :-1]
    assert (steps_[b["input_ids"][:, :-1] == TOK.eos_id] == 1).all()


def _save(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_memmap_validation_and_tokenizer_check(prepared, tmp_path):
    out, _ = prepared
    val = list(build_val_loader(dataset_config(pretokenized_dir=str(out)), TOK, 2))
    assert val and (val[-1]["labels"] == IGNORE_INDEX).any()
    from llm.data.tokenizer import train_bpe

    other = train_bpe(["some text"] * 10, vocab_size=300)
    with pytest.raises(ValueError, match="tokenizer"):
        build_train_loader(dataset_config(pretokenized_dir=str(out)), other, 2)
    # the same size and special ids but another vocabulary: caught by the recorded vocabulary hash
    rng = random.Random(0)
    words = [" ".join("".join(rng.choices("abcdefghij", k=rng.randint(2, 8))) for _ in range(200)) for _ in range(50)]
    same_size = train_bpe(words, vocab_size=TOK.vocab_size)
    assert same_size.vocab_size == TOK.vocab_size and same_size.eos_id == TOK.eos_id
    with pytest.raises(ValueError, match="whose vocabulary differs"):
        build_train_loader(dataset_config(pretokenized_dir=str(out)), same_size, 2)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        build_train_loader(dataset_config(pretokenized_dir=str(tmp_path / "nothing")), TOK, 2)


def test_memmap_validation_read_in_chunks_equals_one_read(prepared, monkeypatch):
    from llm.data import pretokenized

    out, _ = prepared
    cfg = dataset_config(pretokenized_dir=str(out), seq_len=8)
    whole = list(build_val_loader(cfg, TOK, 1))
    monkeypatch.setattr(pretokenized, "_VAL_READ_TOKENS", 5)  # chunk = max(5, 4 * 1 * 8) = 32 tokens
    chunked = list(build_val_loader(cfg, TOK, 1))
    assert len(whole) == len(chunked) > 4
    for a, b in zip(whole, chunked, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "doc_ids"))


def test_prepare_data_script(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    import prepare_data

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset_config:\n  mix: embedded\n  seq_len: 16\n")
    assert prepare_data.main(["--config", str(cfg), "--output", str(tmp_path / "o"), "--max-tokens", "3000", "--no-validation"]) == 0
    written = sum(s["tokens"] for s in read_index(tmp_path / "o")["train"])
    assert 3000 <= written < 3000 + 1000  # stops after the document that reaches the budget
    assert prepare_data.main(["--config", str(cfg), "--output", str(tmp_path / "o2")]) == 2
    assert "max_tokens" in capsys.readouterr().err
