import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llm.config.defaults import DatasetConfig, DataSourceConfig
from llm.config.errors import ConfigError
from llm.data.sources import (
    check_first_record,
    check_sources_reachable,
    format_record,
    iter_file_records,
    iter_source_texts,
    load_mix,
    resolve_sources,
)


def _texts(**src):
    return list(iter_source_texts(DataSourceConfig(name="s", type="local", **src), "train"))


def test_every_local_format(tmp_path):
    records = [{"text": "first doc", "title": "A"}, {"text": "second doc", "title": "B"}]
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    (tmp_path / "r.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    (tmp_path / "r.txt").write_text("para one\nstill one\n\npara two\n")
    want = ["first doc", "second doc"]
    assert _texts(path=str(tmp_path / "r.jsonl.gz")) == want
    assert _texts(path=str(tmp_path / "r.json")) == want
    assert _texts(path=str(tmp_path / "r.parquet")) == want
    assert _texts(path=str(tmp_path / "r.txt")) == ["para one\nstill one", "para two"]
    assert _texts(path=str(tmp_path / "r.txt"), sample_by="line") == ["para one", "still one", "para two"]
    assert _texts(path=str(tmp_path / "r.*"), template="{title}: {text}")[:2] == ["A: first doc", "B: second doc"]
    assert _texts(path=str(tmp_path / "r.json"), min_chars=10) == ["second doc"]
    with pytest.raises(ValueError, match="not a .jsonl"):
        (tmp_path / "x.csv").write_text("a,b")
        _texts(path=str(tmp_path / "x.csv"))


def test_mixes_file(tmp_path):
    mixes = tmp_path / "d.yaml"
    mixes.write_text(yaml.safe_dump({"mixes": {"m": [{"name": "x", "type": "embedded", "weight": 2}], "bad": [{"nmae": "x"}]}}))
    assert [s.name for s in load_mix(str(mixes), "m")] == ["x"]
    with pytest.raises(ConfigError, match=r"mixes.bad\[0\].nmae: unknown key"):
        load_mix(str(mixes), "bad")
    with pytest.raises(ConfigError, match="defines: bad, m"):
        load_mix(str(mixes), "zzz")
    assert resolve_sources(DatasetConfig(mix="embedded", datasets_file=str(tmp_path / "none.yaml")))[0].type == "embedded"
    # a mix's sources get the same checks as inline ones
    for entry, message in (
        ({"type": "local", "path": "a.jsonl", "weight": 0}, r"mixes.z\[0\].weight: got 0.0; must be a finite number > 0"),
        ({"type": "local", "path": "a.jsonl", "holdout_documents": -3}, r"mixes.z\[0\].holdout_documents: got -3"),
        ({"type": "local", "path": "a.jsonl", "holdout_documents": 5, "validation_split": "val"}, "not both"),
    ):
        mixes.write_text(yaml.safe_dump({"mixes": {"z": [entry]}}))
        with pytest.raises(ConfigError, match=message):
            load_mix(str(mixes), "z")
    shipped = yaml.safe_load(open("configs/datasets.yaml"))["mixes"]
    assert {"embedded", "web_mix"} <= set(shipped)
    for name in shipped:
        assert load_mix("configs/datasets.yaml", name)


def test_corrupt_or_truncated_files_are_one_line_errors_naming_the_file(tmp_path):
    not_gzip = tmp_path / "a.jsonl.gz"
    not_gzip.write_bytes(b'{"text": "plain json lines, not gzip"}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl\.gz: cannot read the file, it is corrupt or truncated"):
        list(iter_file_records(str(not_gzip)))
    whole = gzip.compress(b"".join(json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(500)))
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"t\.jsonl\.gz: cannot read the file, it is corrupt or truncated"):
        list(iter_file_records(str(truncated)))
    parquet = tmp_path / "p.parquet"
    parquet.write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match=r"p\.parquet: not a readable parquet file"):
        list(iter_file_records(str(parquet)))


def test_template_that_does_not_fit_a_record(tmp_path):
    """A template indexing a field of the wrong type: the first record is a config error, later ones are
    bad records (skipped and counted), never a traceback."""
    src = DataSourceConfig(name="s", type="local", path="x", template="{title} {n[0]}")
    assert format_record({"title": "t", "n": 5}, "text", src.template, 0, 0) is None
    assert format_record({"title": "t", "n": [1]}, "text", src.template, 0, 0) == "t 1"
    with pytest.raises(ValueError, match="template '{title} {n\\[0\\]}' does not fit the records"):
        check_first_record(src, {"title": "t", "n": 5}, "source 's'")


def test_reachability_check_names_the_source_and_skips_pretokenized_data(tmp_path, monkeypatch):
    """Checked without reading anything: a hub dataset streamed while the hub is off, a local train or
    validation pattern matching no file; a config that trains from pretokenized_dir reads no source."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    ok = DataSourceConfig(name="ok", type="local", path=str(tmp_path / "*.jsonl"))
    hub = DataSourceConfig(name="web", type="hub", path="some/dataset", streaming=True)
    no_val = DataSourceConfig(name="nv", type="local", path=ok.path, validation_split=str(tmp_path / "v/*.jsonl"))
    check_sources_reachable(DatasetConfig(sources=[ok]))
    for src, message in ((hub, "source 'web': hub dataset 'some/dataset' cannot be streamed"),
                         (no_val, "source 'nv': no file matches")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            check_sources_reachable(DatasetConfig(sources=[ok, src]))
    check_sources_reachable(DatasetConfig(sources=[hub], pretokenized_dir=str(tmp_path)))
    cached = DataSourceConfig(name="c", type="hub", path="some/dataset", streaming=False)  # may be cached
    check_sources_reachable(DatasetConfig(sources=[cached]))
