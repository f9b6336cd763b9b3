import os
import subprocess
import sys
import time

import pytest

from llm.config.defaults import DatasetConfig
from llm.data.tokenizer import build_tokenizer, embedded_tokenizer, train_bpe

TEXTS = ["Hello world, the brave tomavi sees Zubo .", "ünïcödé ✓ 漢字 and emoji 🙂", "  spaces\n\nnewlines\t tabs "]


def test_embedded_round_trip_and_specials():
    tok = build_tokenizer(DatasetConfig(tokenizer="embedded"))
    assert tok.vocab_size == 512 and (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, 2)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eos_id], skip_special_tokens=False) == "<|eos|>"
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_embedded_tokenizer_is_identical_in_a_fresh_process():
    code = "from llm.data.tokenizer import embedded_tokenizer as e; print(e().backend.to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == embedded_tokenizer().backend.to_str()


def test_save_and_load_local_file(tmp_path):
    tok = train_bpe(TEXTS * 20, vocab_size=300)
    tok.save(tmp_path)
    for spec in (str(tmp_path), str(tmp_path / "tokenizer.json")):
        loaded = build_tokenizer(DatasetConfig(tokenizer=spec))
        assert (loaded.vocab_size, loaded.eos_id, loaded.bos_id, loaded.pad_id) == (300, tok.eos_id, tok.bos_id, tok.pad_id)
        assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_bad_tokenizer_specs(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        build_tokenizer(DatasetConfig(tokenizer=str(tmp_path / "missing.json")))
    # a missing folder is reported as a missing path, not looked up as a hub name
    for missing in (str(tmp_path / "no_such_dir") + "/", "./no_such_dir/tok", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="dataset_config.tokenizer: no tokenizer file"):
            build_tokenizer(DatasetConfig(tokenizer=missing))
    (tmp_path / "bad.json").write_text("{1: 2}")
    with pytest.raises(ValueError, match=r"bad\.json' is not a valid tokenizer.json"):
        build_tokenizer(DatasetConfig(tokenizer=str(tmp_path / "bad.json")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        build_tokenizer(DatasetConfig(tokenizer="some-org/not-cached-tokenizer"))
    assert time.perf_counter() - start < 2.0
    # HF_DATASETS_OFFLINE alone also means offline, as it does for hub data sources
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_DATASETS_OFFLINE"):
        build_tokenizer(DatasetConfig(tokenizer="some-org/not-cached-tokenizer"))
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, vocab_size=100)


def test_train_tokenizer_script(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
    import train_tokenizer

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset_config:\n  mix: embedded\n  datasets_file: configs/datasets.yaml\n")
    out = tmp_path / "tok"
    assert train_tokenizer.main(["--config", str(cfg), "--vocab-size", "300", "--max-documents", "50", "--output", str(out)]) == 0
    assert build_tokenizer(DatasetConfig(tokenizer=str(out))).vocab_size == 300
    assert train_tokenizer.main(["--config", str(cfg), "--vocab-size", "10", "--output", str(out)]) == 2
