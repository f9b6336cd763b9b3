"""llm/training/ablation.py and scripts/run_ablations.py: planning, a tiny end-to-end study, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from trainer_helpers import PYTHON, ROOT, script_env, tiny_overrides

from llm.config import ConfigError, load_config, validate_config
from llm.training.ablation import (
    MANIFEST,
    AblationError,
    PlannedRun,
    Study,
    balanced_factors,
    plan_study,
)
from llm.training.ablation_report import summary_rows

CONFIG = str(ROOT / "configs" / "config.yaml")
TINY = str(ROOT / "configs" / "tiny.yaml")
SCRIPT = str(ROOT / "scripts" / "run_ablations.py")
PEER = "model_config.peer_config."


def _plan(path, *overrides, **kwargs):
    base = load_config(path, overrides)
    return plan_study(base, path, kwargs.pop("output_dir", "study"), **kwargs)


def _peer(configs, name):
    return configs[name].model_config.peer_config


def test_balanced_factors():
    assert balanced_factors(2**20, 2) == [1024, 1024]
    assert balanced_factors(2**20, 3) == [128, 128, 64]
    assert balanced_factors(4096, 4) == [8, 8, 8, 8]
    assert balanced_factors(360, 3) == [9, 8, 5]
    assert balanced_factors(13, 2) is None  # a prime has no split into parts >= 2


def test_builtin_axes_derive_from_the_reference_config():
    study, configs = _plan(CONFIG)
    assert study.strategy == "one_at_a_time" and study.runs[0].name == "baseline"
    # expert_count: parts / 4, / 2, / 1 of the 1024^2 base.
    assert study.axes["expert_count"] == ["N65536", "N262144", "N1048576"]
    assert study.base_variants["expert_count"] == "N1048576"
    assert _peer(configs, "expert_count=N65536").product_key_dim == [256, 256]
    # expert_size: N * m constant.
    for m in (4, 16):
        pc = _peer(configs, f"expert_size=m{m}")
        assert (
            pc.expert_hidden_size == m and pc.num_experts * m == 2**20 and math.prod(pc.product_key_dim) == 2**20 // m
        )
    # product_dims: same N in 3 and 4 parts; query_dim a multiple of P.
    p3, p4 = _peer(configs, "product_dims=P3"), _peer(configs, "product_dims=P4")
    assert (p3.product_key_dim, p3.query_dim) == ([128, 128, 64], 129)
    assert (p4.product_key_dim, p4.query_dim) == ([32, 32, 32, 32], 128)
    # num_heads: h/2, h, 2h with h * k constant.
    assert study.axes["num_heads"] == ["h4", "h8", "h16"]
    assert [(_peer(configs, f"num_heads=h{h}").num_experts_per_tok) for h in (4, 16)] == [32, 8]
    # data_mix: every usable mix; the local example without files is skipped with a note.
    assert study.axes["data_mix"] == ["embedded", "web_mix", "web_only", "code_heavy"]
    assert configs["data_mix=code_heavy"].dataset_config.mix == "code_heavy"
    assert any("local_example" in note for note in study.notes)
    # one run per non-base variant, each only differing in its own overrides, all valid
    assert len(study.runs) == 1 + 3 + 2 + 2 + 2 + 2
    for run in study.runs:
        config = configs[run.name]
        validate_config(config)
        assert config.train_config.output_dir.endswith(run.name) and run.params_total > 0


def test_grid_composes_axes_and_counts_multiply():
    one, _ = _plan(TINY, axes=["num_heads", "product_dims"])
    grid, configs = _plan(TINY, axes=["num_heads", "product_dims"], strategy="grid")
    assert len(one.runs) == 1 + 2 + 2 and len(grid.runs) == 3 * 3
    pc = _peer(configs, "product_dims=P3+num_heads=h8")
    assert (pc.product_key_dim, pc.num_heads, pc.num_experts_per_tok, pc.query_dim) == ([16, 16, 16], 8, 4, 66)
    assert grid.runs[1].overrides == {}  # P2 + h4 is the base config: no-op overrides are dropped


def test_tokens_and_config_axes(tmp_path):
    axes = "ablation_config.axes={lr: {lo: {train_config.lr: 1.0e-3}, hi: {train_config.lr: 2.0e-3}}}"
    study, configs = _plan(TINY, axes, axes=["lr"], tokens=5_000_000_000)
    assert [r.name for r in study.runs] == ["baseline", "lr=lo"]  # hi equals the base config
    assert study.base_variants == {"lr": "hi"} and configs["lr=lo"].train_config.lr == 1e-3
    assert all(c.train_config.max_tokens == 5_000_000_000 for c in configs.values())


def test_an_axis_that_sets_the_run_length_keeps_it_and_held_out_changes_are_noted(tmp_path):
    axes = ("ablation_config.axes={budget: {small: {train_config.max_tokens: 1000}, big: {train_config.max_tokens: 4000}},"
            " bs: {b2: {train_config.batch_size: 2}}}")  # fmt: skip
    study, configs = _plan(TINY, axes, axes=["budget", "bs"], tokens=2000)
    assert configs["budget=small"].train_config.max_tokens == 1000 and configs["budget=big"].train_config.max_tokens == 4000
    assert configs["baseline"].train_config.max_tokens == 2000
    assert any("budget=small" in n and "does not apply" in n for n in study.notes)
    from llm.training.ablation_report import render_markdown

    text = render_markdown(study, summary_rows(study, tmp_path)[0], "val_loss")  # nothing trained yet
    assert "bs=b2 sets train_config.batch_size" in text and "other data than the rest" in text
    assert "except budget=small, budget=big, whose axis sets the length" in text


def test_runner_trains_each_run_in_its_folder_as_seen_now(tmp_path, monkeypatch):
    """config.yaml keeps the folder as planned (relative, or of the original location of a copied study);
    the runner names the folder it actually holds, so the trainer writes and resumes there."""
    from llm.training import ablation

    launched = []

    class FakeProcess:
        def __init__(self, cmd, **kwargs):
            launched.append(cmd)

        def wait(self):
            return 0

        def send_signal(self, sig):
            pass

    monkeypatch.setattr(ablation.subprocess, "Popen", FakeProcess)
    monkeypatch.chdir(tmp_path)
    study = Study("base.yaml", "one_at_a_time", {}, {}, 0, runs=[PlannedRun("baseline", {}, {})])
    (tmp_path / "copied_study" / "baseline").mkdir(parents=True)
    ablation.Runner(study, Path("copied_study"), ["0"], say=lambda _: None).run()
    (cmd,) = launched
    assert f"train_config.output_dir={tmp_path / 'copied_study' / 'baseline'}" in cmd
    assert study.runs[0].status == "interrupted"  # exit 0 without a final evaluation
    # A run that reached its final evaluation is completed even if a stop signal then ended it (rc -15).
    FakeProcess.wait = lambda self: -15
    monkeypatch.setattr(ablation, "run_finished", lambda run_dir: True)
    ablation.Runner(study, Path("copied_study"), ["0"], say=lambda _: None).run()
    assert study.runs[0].status == "completed"
    # A run that finished while the manifest still said "running" (the runner was killed before saving
    # it) is recognised, not trained again.
    launched.clear()
    study.runs[0].status = "running"
    ablation.Runner(study, Path("copied_study"), ["0"], say=lambda _: None).run()
    assert launched == [] and study.runs[0].status == "completed"


def test_runner_forwards_a_closed_terminal_to_its_trainers():
    """SIGHUP (terminal closed) is handled like SIGTERM, so trainers in their own sessions are not orphaned."""
    import signal

    from llm.training import ablation

    runner = ablation.Runner(Study("b.yaml", "one_at_a_time", {}, {}, 0, runs=[]), Path("."), ["0"], say=lambda _: None)
    previous = runner._install_signals()
    try:
        assert set(previous) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        assert signal.getsignal(signal.SIGHUP) is signal.getsignal(signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_bad_combination_is_named_before_anything_runs(tmp_path):
    axes = "ablation_config.axes={experts: {odd: {model_config.peer_config.num_experts: 100}}}"
    with pytest.raises(AblationError, match=r"run experts=odd: model_config\.peer_config\.product_key_dim"):
        _plan(TINY, axes, axes=["experts"], output_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_errors_are_one_line(tmp_path, capsys):
    main, out = _script_main(), ["--output-dir", str(tmp_path / "out")]
    cases = [
        ([*out, "--base-config", TINY, "--axes", "nope", "--dry-run"], "allowed: data_mix, expert_count, expert_size"),
        (["--resume", "--output-dir", str(tmp_path / "none")], "no study"),
        (["--resume", "--axes", "num_heads", *out], "drop --axes"),
        ([*out, "--base-config", TINY, "--gpus", "0", "--axes", "num_heads"], "--gpus: got 0"),
        ([*out, "--custom-datasets", str(tmp_path / "missing.yaml"), "--base-config", TINY], "does not exist"),
        # data that no run could read fails the plan once (the tests run with HF_HUB_OFFLINE=1)
        ([*out, "--base-config", TINY, "--axes", "num_heads", "--set",
          "dataset_config.sources=[{name: web, type: hub, path: some/dataset, streaming: true}]"],
         "run baseline: source 'web': hub dataset 'some/dataset' cannot be streamed while HF_HUB_OFFLINE=1"),
        ([*out, "--base-config", TINY, "--axes", "num_heads", "--set",
          f"dataset_config.sources=[{{name: notes, type: local, path: {tmp_path}/none/*.jsonl}}]"],
         "source 'notes': no file matches"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1 and expected in err, (argv, err)
    with pytest.raises(SystemExit) as exc:  # argparse's own errors: one line too
        main(["--tokens", "lots"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "token count" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_a_study_whose_data_is_unreachable_here_and_says_so(tmp_path, capsys):
    """A plan can be made offline for a study that a connected machine runs: --dry-run prints it with a
    note naming what would stop training here (a real run fails before writing anything)."""
    hub = "dataset_config.sources=[{name: web, type: hub, path: some/dataset, streaming: true}]"
    argv = ["--output-dir", str(tmp_path / "s"), "--base-config", TINY, "--axes", "num_heads", "--dry-run"]
    assert _script_main()([*argv, "--set", hub]) == 0
    out = capsys.readouterr().out
    assert "note: training here would stop before the first run: run baseline: source 'web'" in out
    assert not (tmp_path / "s").exists()


def test_gpus_beyond_the_machines_cuda_devices_are_refused(monkeypatch):
    from llm.training import ablation

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(ablation, "_cuda_device_count", lambda: 2)
    with pytest.raises(AblationError, match="--gpus: got 4; this machine has 2 CUDA device"):
        ablation._devices(4)
    assert ablation._devices(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert ablation._devices(2) == ["5", "7"]
    # no GPU for the runs: an empty CUDA_VISIBLE_DEVICES is passed on (they see none, even on a machine
    # that has some); on a machine without CUDA the ids are CPU slots
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert ablation._devices(3) == ["", "", ""]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(ablation, "_cuda_device_count", lambda: 0)
    assert ablation._devices(3) == ["0", "1", "2"] and ablation._cpu_only()


def test_ranking_falls_back_to_train_loss_without_held_out_loss(tmp_path):
    for name, loss in (("a", 3.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        records = [{"step": 1, "loss": loss + 1, "tokens": 10}, {"step": 2, "loss": loss, "tokens": 20},
                   {"step": 2, "val_loss": None, "val_perplexity": None}]  # fmt: skip
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [PlannedRun("a", {"x": "a"}, {}, status="completed"), PlannedRun("b", {"x": "b"}, {}, status="completed")]
    rows, metric = summary_rows(
        Study("base.yaml", "one_at_a_time", {"x": ["a", "b"]}, {"x": "a"}, 0, runs=runs), tmp_path
    )
    assert metric == "train_loss" and [r["run"] for r in rows] == ["b", "a"] and rows[0]["train_loss"] == 2.5


def test_a_run_without_a_final_held_out_loss_ranks_last_instead_of_switching_to_train_loss(tmp_path):
    """A run whose loss went non-finite at the end logs val_loss null; its last finite train losses (from
    before it diverged) must not make it the winner of a train-loss ranking."""
    for name, val, train in (("a", 3.0, 3.2), ("b", 2.5, 2.9), ("diverged", None, 2.0)):
        (tmp_path / name).mkdir()
        records = [{"step": 2, "loss": train, "tokens": 20}, {"step": 2, "val_loss": val, "val_perplexity": None}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [PlannedRun(n, {"x": n}, {}, status="completed") for n in ("a", "b", "diverged")]
    rows, metric = summary_rows(Study("base.yaml", "one_at_a_time", {"x": ["a", "b", "diverged"]}, {"x": "a"}, 0, runs=runs), tmp_path)
    assert metric == "val_loss" and [r["run"] for r in rows] == ["b", "a", "diverged"]


def test_report_warns_when_ranked_runs_trained_different_token_counts(tmp_path):
    from llm.training.ablation_report import render_markdown

    for name, tokens in (("a", 100), ("b", 400)):
        (tmp_path / name).mkdir()
        records = [{"step": 2, "loss": 3.0, "tokens": tokens}, {"step": 2, "val_loss": 2.0, "val_perplexity": 7.4}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [PlannedRun(n, {"x": n}, {}, status="completed") for n in ("a", "b")]
    study = Study("base.yaml", "one_at_a_time", {"x": ["a", "b"]}, {"x": "a"}, 0, runs=runs)
    text = render_markdown(study, *summary_rows(study, tmp_path))
    assert "the ranked runs trained different numbers of tokens (a 100, b 400)" in text


def test_an_axis_named_like_a_report_column_is_refused():
    with pytest.raises(ConfigError, match=r"ablation_config\.axes: got 'steps'; an axis may not be named like a column"):
        load_config(None, ["ablation_config.axes={steps: {short: {train_config.max_steps: 2}}}"])


# ----------------------------------------------------------------------------------------
# End to end: the real script, the real trainer in subprocesses
# ----------------------------------------------------------------------------------------

AXES = (
    "ablation_config.axes={lr: {lo: {train_config.lr: 1.0e-3}, hi: {train_config.lr: 3.0e-3},"
    " broken: {model_config.vocab_size: 64}}}"  # valid config, but the trainer rejects the tokenizer
)


def _study(out, *extra):
    sets = tiny_overrides(out / "unused", "train_config.max_steps=4", "train_config.checkpoint_interval=2",
                          "train_config.log_interval=2", "eval_config.sample_tokens=0", AXES)  # fmt: skip
    cmd = [PYTHON, SCRIPT, "--base-config", TINY, *[a for s in sets for a in ("--set", s)], "--output-dir", str(out)]
    env = {k: v for k, v in script_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _resume(out):
    env = {k: v for k, v in script_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    cmd = [PYTHON, SCRIPT, "--resume", "--output-dir", str(out), "--gpus", "2"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_study_ranks_runs_and_resume_reruns_only_what_is_missing(tmp_path):
    out = tmp_path / "study"
    proc = _study(out, "--axes", "lr", "--gpus", "2")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: the broken run failed
    manifest = json.loads((out / MANIFEST).read_text())
    status = {r["name"]: r["status"] for r in manifest["runs"]}
    assert status == {"baseline": "completed", "lr=lo": "completed", "lr=broken": "failed"}
    # two runs at once, each on its own device
    devices = {(out / n / "train.log").read_text().split("CUDA_VISIBLE_DEVICES=")[1][0] for n in status}
    assert devices == {"0", "1"}

    results = (out / "results.md").read_text()
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,run,status,lr,val_loss") and len(csv_lines) == 4
    ranked = [line.split(",")[1] for line in csv_lines[1:3]]
    assert sorted(ranked) == ["baseline", "lr=lo"] and f"**Best: {ranked[0]}**" in results
    assert "### lr" in results and "| hi (base) | 1 |" in results and "| lo | 1 |" in results
    assert "lr=broken**: failed, exit code 2" in results and "model_config.vocab_size" in results
    assert "Ranking" in proc.stdout and "Traceback" not in proc.stderr
    ranking_lines = proc.stdout.split("Ranking", 1)[1]
    assert ranked[0] in ranking_lines and "results: " in ranking_lines  # the table and the path were printed

    # Simulate a kill of lr=lo after its step-2 checkpoint: later checkpoints and records gone.
    lo = out / "lr=lo"
    for step in ("00000004",):
        for f in sorted((lo / "checkpoints" / f"step_{step}").iterdir()):
            f.unlink()
        (lo / "checkpoints" / f"step_{step}").rmdir()
    records = [line for line in (lo / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (lo / "metrics.jsonl").write_text("\n".join(records) + "\n")
    manifest["runs"][1]["status"] = "running"  # the runner itself was killed
    (out / MANIFEST).write_text(json.dumps(manifest))
    baseline_log = (out / "baseline" / "train.log").read_text()

    again = _resume(out)
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads((out / MANIFEST).read_text())["runs"]}
    assert runs["baseline"]["attempts"] == 1 and (out / "baseline" / "train.log").read_text() == baseline_log
    assert runs["lr=lo"]["status"] == "completed" and runs["lr=lo"]["attempts"] == 2
    assert "resumed from" in (lo / "train.log").read_text() and "step_00000002" in (lo / "train.log").read_text()
    assert runs["lr=broken"]["status"] == "failed" and runs["lr=broken"]["attempts"] == 2  # retried
    assert "1 of 3 runs already finished" in again.stdout
    assert os.path.isfile(out / "results.md")
