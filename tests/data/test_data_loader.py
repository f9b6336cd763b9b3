import io
import time

import pytest
import torch
from data_helpers import dataset_config, docs, write_jsonl

from llm.config.defaults import DataSourceConfig
from llm.config.errors import ConfigError
from llm.data import loader as loader_module
from llm.data.loader import LoaderPlan, MixStream, build_train_loader, build_val_loader
from llm.data.packing import IGNORE_INDEX
from llm.data.tokenizer import embedded_tokenizer

TOK = embedded_tokenizer()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x[k], y[k]) for x, y in zip(xs, ys, strict=True) for k in ("input_ids", "labels", "doc_ids"))


@pytest.mark.parametrize("kind,workers", [("embedded", 0), ("local", 0), ("local", 2)])
def test_resume_equals_uninterrupted_run_at_many_cut_points(kind, workers, two_sources):
    sources = [DataSourceConfig(name="e", type="embedded")] if kind == "embedded" else two_sources
    cfg = dataset_config(sources, num_workers=workers, prefetch_factor=2)
    ref_loader = build_train_loader(cfg, TOK, 2)
    reference = _take(iter(ref_loader), 24)
    loader = build_train_loader(cfg, TOK, 2)
    it = iter(loader)
    done = 0
    for cut in (1, 4, 9, 16):
        done += len(_take(it, cut - done))
        state = torch.load(_roundtrip(loader.state_dict()), weights_only=True)
        resumed = build_train_loader(cfg, TOK, 2)
        resumed.load_state_dict(state)
        assert _equal(_take(iter(resumed), 24 - cut if workers == 0 else 4), reference[cut : 24 if workers == 0 else cut + 4]), cut
    with pytest.raises(ValueError, match="world_size"):
        build_train_loader(cfg, TOK, 2, rank=0, world_size=2).load_state_dict(loader.state_dict())


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_interleave_ratio_matches_weights(two_sources):
    loader = build_train_loader(dataset_config(two_sources), TOK, 4)
    # no tokens counted yet (as on the pre-tokenized path, which keeps no per-source counts): no "achieved"
    assert loader.mix_report() == {"data/a/requested": 0.75, "data/b/requested": 0.25}
    _take(iter(loader), 150)
    report = loader.mix_report()
    counts = loader.source_token_counts()
    assert counts["a"] > 0 and counts["b"] > 0
    # Weights 3:1 over documents of similar length: token shares within a few percent.
    assert abs(report["data/a/achieved"] - 0.75) < 0.06 and report["data/a/requested"] == 0.75


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_cover_one_epoch(two_sources, world):
    cfg = dataset_config(two_sources[:1], stopping_strategy="first_exhausted")
    plan = LoaderPlan(cfg, TOK, two_sources[:1], 1, 0, world)
    seen = [[t for _, t in MixStream(plan, node, world, None, max_epochs=1)] for node in range(world)]
    flat = [t for s in seen for t in s]
    assert len(flat) == len(set(flat)) == 60
    assert set(flat) == set(docs("alpha", 60))


def test_first_exhausted_warns_when_the_mix_restarts(two_sources, caplog):
    """first_exhausted restarts every source when the smallest runs out: the first rollover says so."""
    loader_module._warn_once.cache_clear()  # an earlier test may have warned already
    cfg = dataset_config(two_sources, stopping_strategy="first_exhausted")
    plan = LoaderPlan(cfg, TOK, two_sources, 1, 0, 1)
    with caplog.at_level("WARNING", logger="llm.data.loader"):
        one_epoch = sum(1 for _ in MixStream(plan, 0, 1, None, max_epochs=1))
        assert "first_exhausted" not in caplog.text  # the warning comes with the second epoch's start
        assert sum(1 for _ in MixStream(plan, 0, 1, None, max_epochs=2)) > one_epoch
    assert "every epoch restarts each source" in caplog.text


def test_worker_errors_surface_as_the_workers_one_line_message(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", docs("x", 5))
    cfg = dataset_config([DataSourceConfig(name="s", type="local", path=str(path), text_field="body")], num_workers=2)
    with pytest.raises(ValueError) as info:
        next(iter(build_train_loader(cfg, TOK, 2)))
    message = str(info.value)
    assert "records have no field 'body'" in message and "Traceback" not in message and "\n" not in message


def test_uneven_ranks_yield_equal_batches(tmp_path):
    # 5 small documents across 2 ranks x 2 workers: every node's share differs, each still yields forever.
    path = write_jsonl(tmp_path / "s.jsonl", docs("x", 5))
    cfg = dataset_config([DataSourceConfig(name="s", type="local", path=str(path))])
    counts = [len(_take(iter(build_train_loader(cfg, TOK, 2, rank=r, world_size=2)), 30)) for r in range(2)]
    assert counts == [30, 30]
    val_cfg = dataset_config([DataSourceConfig(name="s", type="local", path=str(path), validation_split=str(path))], seq_len=4)
    val = [list(build_val_loader(val_cfg, TOK, 1, rank=r, world_size=3)) for r in range(3)]
    assert len(val[0]) == len(val[1]) == len(val[2]) > 0


def test_validation_is_finite_padded_and_per_source(two_sources):
    cfg = dataset_config(two_sources)
    batches = list(build_val_loader(cfg, TOK, 2))
    assert batches and all(b["input_ids"].shape == (2, 16) for b in batches)
    assert (batches[-1]["labels"] == IGNORE_INDEX).any() and not (batches[0]["labels"] == IGNORE_INDEX).any()
    text = TOK.decode(torch.cat([b["input_ids"] for b in batches]).view(-1).tolist())
    assert "aval000" in text and "beta" not in text  # only source a has a validation split
    assert list(build_val_loader(cfg, TOK, 2, source="a"))
    with pytest.raises(ValueError, match="not in the mix"):
        build_val_loader(cfg, TOK, 2, source="zzz")


def test_malformed_records_are_skipped_counted_and_capped(tmp_path, caplog):
    write_jsonl(tmp_path / "m.jsonl", docs("ok", 20), extra_lines=(b"{not json", b'{"text": "\xff\xfe bad utf8"}', b'{"other": 1}'))
    write_jsonl(tmp_path / "m2.jsonl", docs("more", 20))
    src = DataSourceConfig(name="m", type="local", path=str(tmp_path / "m*.jsonl"))
    loader = build_train_loader(dataset_config([src]), TOK, 2)
    _take(iter(loader), 30)
    assert loader.state_dict()["workers"][0]["bad_records"] >= 3
    assert "malformed" in caplog.text
    with pytest.raises(ValueError, match="max_bad_records=2"):
        _take(iter(build_train_loader(dataset_config([src], max_bad_records=2), TOK, 2)), 30)


def test_bad_inputs_fail_with_clear_messages(tmp_path, monkeypatch):
    good = write_jsonl(tmp_path / "g.jsonl", docs("g", 3))

    def build(**src):
        return build_train_loader(dataset_config([DataSourceConfig(name="s", **src)]), TOK, 2)

    with pytest.raises(FileNotFoundError, match="no file matches"):
        _take(iter(build(type="local", path=str(tmp_path / "missing*.jsonl"))), 1)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no readable records"):
        _take(iter(build(type="local", path=str(tmp_path / "empty.jsonl"))), 1)
    with pytest.raises(ValueError, match="no field 'body'"):
        _take(iter(build(type="local", path=str(good), text_field="body")), 1)
    with pytest.raises(ConfigError, match="weight"):
        build(type="local", path=str(good), weight=-1.0)
    with pytest.raises(ConfigError, match=r"weight: got 0.0; must be a finite number > 0"):
        build(type="local", path=str(good), weight=0.0)
    with pytest.raises(ConfigError, match="defines: .*embedded"):
        build_train_loader(dataset_config(mix="no_such_mix", datasets_file="configs/datasets.yaml"), TOK, 2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        _take(iter(build(type="hub", path="HuggingFaceFW/fineweb-edu")), 1)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("world", [1, 2])
def test_holdout_documents_form_validation_and_never_train(tmp_path, world):
    # Two files so the source has two shards: the exclusion must hold however nodes split them.
    write_jsonl(tmp_path / "h1.jsonl", docs("hone", 20))
    write_jsonl(tmp_path / "h2.jsonl", docs("htwo", 20))
    src = DataSourceConfig(name="h", type="local", path=str(tmp_path / "h*.jsonl"), holdout_documents=5)
    cfg = dataset_config([src], stopping_strategy="first_exhausted")
    plan = LoaderPlan(cfg, TOK, [src], 1, 0, world)
    trained = [t for node in range(world) for _, t in MixStream(plan, node, world, None, max_epochs=1)]
    held_out = docs("hone", 5)  # the first five documents of the source, in file order
    assert not set(held_out) & set(trained)
    assert sorted(trained) == sorted(docs("hone", 20)[5:] + docs("htwo", 20))  # nothing else lost
    text = TOK.decode(torch.cat([b["input_ids"] for b in build_val_loader(cfg, TOK, 1)]).view(-1).tolist())
    assert all(d in text for d in held_out) and "hone005" not in text


def test_holdout_and_validation_split_together_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", docs("x", 5))
    cfg = dataset_config([DataSourceConfig(name="s", type="local", path=str(path), validation_split=str(path),
                                           holdout_documents=2)])  # fmt: skip
    with pytest.raises(ConfigError, match=r"sources\[0\].holdout_documents"):
        build_train_loader(cfg, TOK, 2)


def test_validation_takes_one_document_from_each_source_in_turn(tmp_path):
    """An evaluation capped at eval_batches must score every source: validation documents alternate
    between the sources (one that runs out drops out) instead of all of source 0 first."""
    from llm.data.sources import validation_texts

    write_jsonl(tmp_path / "a.jsonl", docs("alpha", 5))
    write_jsonl(tmp_path / "b.jsonl", docs("beta", 2))
    sources = [
        DataSourceConfig(name="a", type="local", path=str(tmp_path / "a.jsonl"), validation_split=str(tmp_path / "a.jsonl")),
        DataSourceConfig(name="train-only", type="local", path=str(tmp_path / "a.jsonl")),
        DataSourceConfig(name="b", type="local", path=str(tmp_path / "b.jsonl"), validation_split=str(tmp_path / "b.jsonl")),
    ]
    order = [i for i, _ in validation_texts(sources)]
    assert order == [0, 2, 0, 2, 0, 0, 0]
    assert [i for i, _ in validation_texts(sources, only="b")] == [2, 2]
    first = next(iter(build_val_loader(dataset_config(sources, seq_len=64), TOK, 1)))
    text = TOK.decode([t for t in first["input_ids"][0].tolist() if t != TOK.pad_id])
    assert "alpha" in text and "beta" in text
