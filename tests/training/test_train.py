"""The training loop end to end on a tiny model: exact resume after SIGKILL, NaN handling, bad input."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import PYTHON, ROOT, script_env, tiny_overrides

from llm.config import ConfigError
from llm.training import train as train_mod
from llm.training.checkpoint import Checkpointer, load_model_weights


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _cmd(run: Path, *extra: str) -> list[str]:
    sets = [a for o in tiny_overrides(run, *extra) for a in ("--set", o)]
    return [PYTHON, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), *sets]


def _kill_at(cmd: list[str], run: Path, step: int) -> int:
    """Start ``cmd``, SIGKILL it once metrics.jsonl reaches ``step``; returns the last step logged."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300  # a hang guard; a loaded machine can be slow to reach the step
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1]).get("step", 0) >= step:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {proc.stderr.read().decode()[-2000:]}"
    return _records(run)[-1]["step"]


def test_sigkill_and_resume_reproduces_losses_bit_for_bit(tmp_path):
    steps = 24
    extra = [f"train_config.max_steps={steps}", "train_config.log_interval=1", "train_config.checkpoint_interval=3",
             "eval_config.sample_tokens=0"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(
        _cmd(straight, *extra), cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    first = _kill_at(_cmd(killed, *extra), killed, 5)
    second = _kill_at(_cmd(killed, *extra) + ["--resume"], killed, 15)
    assert first < second < steps
    done = subprocess.run(
        _cmd(killed, *extra) + ["--resume"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout

    a, b = _records(straight), _records(killed)
    train_a = [(r["step"], r["loss"], r["lr"], r["tokens"], r["grad_norm"]) for r in a if "loss" in r]
    train_b = [(r["step"], r["loss"], r["lr"], r["tokens"], r["grad_norm"]) for r in b if "loss" in r]
    assert [s for s, *_ in train_a] == list(range(1, steps + 1))
    assert train_a == train_b  # every float equal: JSON round-trips doubles exactly
    final_a = load_model_weights(Checkpointer(straight).latest())
    final_b = load_model_weights(Checkpointer(killed).latest())
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def _inject_nan(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss NaN on the given (1-based) optimiser steps; one micro-batch per step."""
    real = train_mod.LossModule.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss, parts = real(self, *args, **kwargs)
        if calls["n"] in bad_steps and self.training:
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(train_mod.LossModule, "forward", forward)


def test_nan_steps_are_skipped_and_counted(tiny_config, monkeypatch):
    config = tiny_config("train_config.max_steps=6", "train_config.log_interval=1", "train_config.max_consecutive_nonfinite=2",
                         "eval_config.sample_tokens=0")  # fmt: skip
    _inject_nan(monkeypatch, {2, 4})
    result = train_mod.train(config)
    assert result.status == "completed" and result.step == 6
    records = {r["step"]: r for r in _records(Path(config.train_config.output_dir)) if "loss" in r}
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None and records[2]["nonfinite_steps"] == 1
    assert math.isfinite(records[3]["loss"]) and records[6]["nonfinite_steps"] == 2
    assert math.isfinite(result.val["perplexity"])


def test_consecutive_nans_stop_cleanly_keeping_last_good_checkpoint(tiny_config, monkeypatch, capsys):
    config = tiny_config("train_config.max_steps=20", "train_config.checkpoint_interval=2",
                         "train_config.max_consecutive_nonfinite=3")  # fmt: skip
    _inject_nan(monkeypatch, set(range(4, 100)))
    result = train_mod.train(config)
    assert result.status == "nonfinite" and result.step == 6
    assert "3 consecutive non-finite losses at step 6" in capsys.readouterr().out
    cp = Checkpointer(config.train_config.output_dir)
    # step 4's update was skipped (NaN): its interval checkpoint is not taken, the last good one stays
    assert [p.name for p in cp.complete()] == ["step_00000002"]
    assert result.checkpoint == str(cp.latest())
    assert all(torch.isfinite(t).all() for t in load_model_weights(cp.latest()).values())


def test_resume_with_a_different_model_names_the_fields(tiny_config):
    config = tiny_config(
        "train_config.max_steps=2", "train_config.checkpoint_interval=2", "eval_config.sample_tokens=0"
    )
    train_mod.train(config)
    changed = tiny_config("train_config.max_steps=4", "train_config.lr=0.5", "model_config.ffn_hidden_size=48")
    with pytest.raises(ConfigError, match=r"model_config\.ffn_hidden_size, train_config\.lr"):
        train_mod.train(changed, resume="latest")


def test_fresh_run_refuses_a_directory_with_checkpoints(tiny_config):
    """A fresh run would prune the old, higher-numbered checkpoints in favour of its own: refuse instead."""
    config = tiny_config("train_config.max_steps=2", "train_config.checkpoint_interval=2", "eval_config.sample_tokens=0")
    train_mod.train(config)
    with pytest.raises(ConfigError, match=r"train_config\.output_dir: .* already holds checkpoints \(latest step_00000002\)"):
        train_mod.train(config)
    resumed = tiny_config("train_config.max_steps=3", "eval_config.sample_tokens=0")
    train_mod.train(resumed, resume="latest")  # --resume continues in the same directory
    assert Checkpointer(resumed.train_config.output_dir).latest().name == "step_00000003"


def test_unwritable_output_dir_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run(_cmd(blocker / "run"), cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: train_config.output_dir:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_max_tokens_sets_the_length(tiny_config):
    from llm.config.defaults import TrainConfig

    tc = TrainConfig(max_tokens=1000, batch_size=2, grad_accum_steps=2)
    assert train_mod.total_training_steps(tc, seq_len=32, world_size=2) == math.ceil(1000 / 256)
    assert train_mod.total_training_steps(TrainConfig(max_steps=7), 32, 1) == 7


def test_rollback_to_an_older_checkpoint_keeps_the_abandoned_run_aside(tiny_config):
    """Resuming from step 2 of a run that reached step 6: the newer checkpoints and the old metrics move to
    an abandoned_* folder, the resumed run's own checkpoints are kept, and a later plain --resume
    continues the resumed run, not the abandoned one."""
    run = tiny_config("train_config.max_steps=6", "train_config.checkpoint_interval=2", "eval_config.sample_tokens=0")
    train_mod.train(run)
    cp = Checkpointer(run.train_config.output_dir)
    rollback = tiny_config(
        "train_config.max_steps=3", "train_config.checkpoint_interval=2", "train_config.keep_last_checkpoints=2",
        "eval_config.sample_tokens=0",
    )  # fmt: skip
    result = train_mod.train(rollback, resume=str(cp.root / "step_00000002"))
    assert [p.name for p in cp.complete()] == ["step_00000002", "step_00000003"]
    assert result.checkpoint == str(cp.root / "step_00000003")
    (aside,) = cp.root.glob("abandoned_after_step_00000002_*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000004", "step_00000006"]
    assert max(r["step"] for r in _records(Path(run.train_config.output_dir))) == 3
    later = tiny_config("train_config.max_steps=4", "eval_config.sample_tokens=0")
    train_mod.train(later, resume="latest")
    assert cp.latest().name == "step_00000004" and (aside / "step_00000004").is_dir()


def test_preflight_checks_output_dir_and_tokenizer_without_training(tiny_config):
    """What scripts/train.sh checks once before torchrun: no model is built, nothing is written."""
    config = tiny_config("train_config.max_steps=2", "train_config.checkpoint_interval=2", "eval_config.sample_tokens=0")
    train_mod.preflight(config, None)  # a fresh, empty output_dir
    assert not Path(config.train_config.output_dir).exists()
    offline_hub = tiny_config("dataset_config.tokenizer=some-org/not-cached-tokenizer")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        train_mod.preflight(offline_hub, None)
    train_mod.train(config)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train_mod.preflight(config, None)
    train_mod.preflight(config, "latest")


def test_preflight_checks_the_resume_target(tiny_config):
    """A --resume path that is not a checkpoint, or a config that differs from the checkpoint's, is one
    error before torchrun starts (scripts/train.sh runs preflight once), not one traceback per rank."""
    from llm.training.checkpoint import CheckpointError

    config = tiny_config("train_config.max_steps=2", "train_config.checkpoint_interval=2", "eval_config.sample_tokens=0")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        train_mod.preflight(config, str(Path(config.train_config.output_dir) / "nope"))
    train_mod.train(config)
    changed = tiny_config("train_config.max_steps=4", "model_config.ffn_hidden_size=48")
    with pytest.raises(ConfigError, match=r"model_config\.ffn_hidden_size"):
        train_mod.preflight(changed, "latest")
    train_mod.preflight(config, str(Checkpointer(config.train_config.output_dir).latest()))


def test_sparse_adam_with_fsdp_is_refused_for_more_than_one_process(tiny_config, monkeypatch):
    """FSDP shards the tables the row-sparse optimiser updates whole (it crashed on the first step):
    train.sh's preflight (told the world size) and train itself (torchrun's WORLD_SIZE) refuse it in one
    line, before anything is written. DDP and single-process FSDP are fine."""
    config = tiny_config("model_config.peer_config.table_optimizer=sparse_adam", "train_config.max_steps=1",
                         "train_config.distributed=fsdp")  # fmt: skip
    train_mod.preflight(config, None, world_size=1)
    train_mod.preflight(tiny_config("model_config.peer_config.table_optimizer=sparse_adam"), None, world_size=2)
    with pytest.raises(ConfigError, match=r"table_optimizer: 'sparse_adam' needs whole expert tables, .* 2 processes"):
        train_mod.preflight(config, None, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="needs whole expert tables"):
        train_mod.train(config)
    assert not Path(config.train_config.output_dir).exists()


def test_resuming_a_finished_run_does_not_rewrite_its_last_checkpoint(tiny_config, monkeypatch):
    """--resume on a run whose latest checkpoint is its last step evaluates and returns that checkpoint;
    saving it again would replace the folder (a rename pair that a crash could interrupt)."""
    config = tiny_config("train_config.max_steps=2", "train_config.checkpoint_interval=2", "eval_config.sample_tokens=0")
    train_mod.train(config)
    saves = []
    real = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda self, *a, **k: saves.append(a[0]) or real(self, *a, **k))
    result = train_mod.train(config, resume="latest")
    assert result.status == "completed" and result.step == 2 and saves == []
    assert result.checkpoint.endswith("step_00000002") and "loss" in result.val


def test_a_signal_during_the_last_step_lets_the_run_finish(tiny_config, monkeypatch):
    """Stopping at the last step used to report 'interrupted' (no final evaluation) and ask for a
    --resume that had nothing left to train."""
    import os
    import signal

    config = tiny_config("train_config.max_steps=3", "eval_config.sample_tokens=0")
    calls = []
    real = train_mod.Loop.train_step

    def step_then_signal(self):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(train_mod.Loop, "train_step", step_then_signal)
    result = train_mod.train(config)
    assert result.status == "completed" and result.step == 3 and "loss" in result.val


def test_a_run_that_fails_before_writing_leaves_no_empty_directory(tiny_config):
    config = tiny_config("dataset_config.tokenizer=some-org/not-cached-tokenizer")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        train_mod.train(config)
    assert not Path(config.train_config.output_dir).exists()


def test_stop_signals_ignore_the_handler_inherited_by_forked_workers():
    """Data-loader workers fork with the trainer's handler installed; a terminal's Ctrl-C reaches them too.
    Only the trainer's process reacts (before, each worker printed its own 'received SIGINT')."""
    import signal

    with train_mod.StopSignals() as signals:
        signals._pid = -1  # as seen from a forked child: another process installed the handler
        signals._handle(signal.SIGINT, None)
        assert signals.received is None
        signals._pid = __import__("os").getpid()
        signals._handle(signal.SIGTERM, None)
        assert signals.received == "SIGTERM"


def test_a_checkpoint_that_cannot_be_written_exits_3(tiny_config, monkeypatch, capsys):
    """Disk full is not bad input: its own exit status, one line, the previous checkpoint named intact."""
    import importlib.util

    from llm.training.checkpoint import CheckpointWriteError

    def full(*args, **kwargs):
        raise CheckpointWriteError("saving checkpoint x failed (disk full: ...); the previous checkpoint y is intact")

    monkeypatch.setattr(train_mod, "train", full)
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", str(ROOT / "configs" / "tiny.yaml")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: saving checkpoint x failed") and err.count("\n") == 1


def test_a_run_without_held_out_data_finishes_and_says_why(tiny_config, tmp_path, capsys):
    """No source has a validation split: the final evaluation scores nothing. The run warns once, logs a
    null held-out loss (so the ablation runner sees it reached its end) and completes."""
    import json

    from llm.training.ablation import run_finished

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 40}) + "\n" for i in range(40)))
    config = tiny_config(
        "train_config.max_steps=2", "eval_config.sample_tokens=0",
        f"dataset_config.sources=[{{name: t, type: local, path: {data}}}]",
    )  # fmt: skip
    result = train_mod.train(config)
    out = capsys.readouterr().out
    assert result.status == "completed" and result.val["tokens"] == 0
    assert out.count("no held-out tokens") == 1 and "held-out loss nan" not in out
    run_dir = Path(config.train_config.output_dir)
    assert _records(run_dir)[-1]["val_loss"] is None and run_finished(run_dir)
