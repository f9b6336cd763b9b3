"""Checkpointer: round trip, retention, fallback past corrupt/incomplete ones, config mismatch, disk full, crash."""

from __future__ import annotations

import errno
import json
import random
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from trainer_helpers import PYTHON, ROOT, script_env
from trainer_helpers import save_toy as _save
from trainer_helpers import trained_toy as _trained

from llm.config import Config, ConfigError
from llm.training import checkpoint as ckpt
from llm.training.checkpoint import MARKER, Checkpointer, CheckpointError, load_model_weights


def test_round_trip_restores_model_optimizer_rng_and_states(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = _save(cp, 5, model, opt)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    assert path.name == "step_00000005" and (path / MARKER).is_file()
    for pt in path.glob("*.pt"):  # every pickle loads without unpickling arbitrary objects
        torch.load(pt, weights_only=True)
    fresh, fresh_opt = _trained(seed=1)
    got = cp.load("latest", fresh, fresh_opt, Config())
    assert got is not None
    folder, trainer_state, rank_state = got
    assert folder == path and trainer_state["step"] == 5 and trainer_state["tokens"] == 50
    assert rank_state["data"] == {"pos": 5}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh.head.weight is fresh.embed.weight  # tying survives the alias round trip
    assert str(opt.state_dict()) == str(fresh_opt.state_dict())
    ckpt.set_rng_state(rank_state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws


def test_load_model_weights_includes_tied_aliases(tmp_path):
    model, opt = _trained()
    path = _save(Checkpointer(tmp_path), 1, model, opt)
    weights = load_model_weights(path)
    assert set(weights) == set(model.state_dict())
    assert torch.equal(weights["head.weight"], model.embed.weight)


def test_keeps_last_k_and_every_mth(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 10):
        _save(cp, step, model, opt)
    assert [ckpt.checkpoint_step(p) for p in cp.complete()] == [4, 8, 9]
    assert not list(cp.root.glob(".tmp_*"))


def test_latest_skips_incomplete_and_falls_back_past_corrupt(tmp_path, caplog):
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        _save(cp, step, model, opt)
    (cp.root / "step_00000003" / MARKER).unlink()  # incomplete
    weights = cp.root / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        folder, state, _ = cp.load("latest", *_trained(seed=1), Config())
    assert folder.name == "step_00000001" and state["step"] == 1
    text = caplog.text
    assert "incomplete checkpoint" in text and "step_00000003" in text
    assert "step_00000002 is unusable" in text and "falling back to step_00000001" in text


def test_latest_with_no_usable_checkpoint_stops_instead_of_starting_over(tmp_path):
    """Starting from step 0 would overwrite the run's checkpoints and metrics: every reason is listed."""
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=5)
    for step in (1, 2):
        weights = _save(cp, step, model, opt) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"none of the 2 complete checkpoints .*\(step_00000002: .*; step_00000001: .*nothing was changed"):
        cp.load("latest", *_trained(seed=1), Config())
    assert len(cp.complete()) == 2


def test_another_world_size_is_never_skipped_for_an_older_checkpoint(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=5)
    for step in (1, 2):
        _save(cp, step, model, opt)
    two_ranks = ckpt.distributed.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ckpt.CheckpointMismatchError, match="written by 1 processes, this run has 2"):
        Checkpointer(tmp_path, keep_last=5, info=two_ranks).load("latest", model, opt, Config())


def test_rollback_sets_newer_checkpoints_and_the_log_aside(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _save(cp, step, model, opt)
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n')
    aside = cp.set_aside_newer(2, [tmp_path / "metrics.jsonl"])
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000003"]
    assert [p.name for p in cp.complete()] == ["step_00000002"] and cp.latest().name == "step_00000002"
    _save(cp, 4, model, opt)  # the resumed run's next checkpoint is kept (it is the newest now)
    assert [p.name for p in cp.complete()] == ["step_00000002", "step_00000004"]
    assert cp.set_aside_newer(4, []) is None


def test_two_rollbacks_within_one_second_keep_both_abandoned_runs(tmp_path, monkeypatch):
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=5)
    monkeypatch.setattr(ckpt.time, "strftime", lambda fmt: "20261128-000000")
    for _ in range(2):
        for step in (1, 2, 3):
            _save(cp, step, model, opt)
        cp.set_aside_newer(1, [])
    assert sorted(p.name for p in cp.root.glob("abandoned_*")) == [
        "abandoned_after_step_00000001_20261128-000000",
        "abandoned_after_step_00000001_20261128-000000.2",
    ]


def test_explicit_corrupt_or_incomplete_checkpoint_is_a_clear_error(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    path = _save(cp, 1, model, opt)
    (path / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        cp.load(str(path), model, opt, Config())
    (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        cp.load(str(path), model, opt, Config())
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        cp.load(str(tmp_path / "nope"), model, opt, Config())


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(tmp_path).load("latest", *_trained(), Config()) is None


def test_config_mismatch_names_the_fields(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    _save(cp, 1, model, opt)
    changed = Config()
    changed.model_config.dim = 64
    changed.train_config.lr = 1.0
    changed.train_config.max_steps = 99  # allowed: extends the run
    with pytest.raises(ConfigError, match=r"model_config\.dim, train_config\.lr") as info:
        cp.load("latest", model, opt, changed)
    assert "max_steps" not in str(info.value)


def test_disk_full_while_saving_keeps_previous(tmp_path, monkeypatch):
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    first = _save(cp, 1, model, opt)

    def full(obj, file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_torch_save", full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"disk full.*step_00000001 is intact"):
        _save(cp, 2, model, opt)
    assert cp.complete() == [first] and not list(cp.root.glob(".tmp_*"))
    monkeypatch.undo()
    assert cp.load("latest", *_trained(seed=2), Config())[0] == first


def test_non_oserror_write_failures_keep_previous(tmp_path, monkeypatch):
    """safetensors raises its own error type on a full disk, torch.save a RuntimeError: same handling."""
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    first = _save(cp, 1, model, opt)

    def full(state, path):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "_write_safetensors", full)
    with pytest.raises(CheckpointError, match=r"disk full: .*step_00000001 is intact"):
        _save(cp, 2, model, opt)
    assert cp.complete() == [first] and not list(cp.root.glob(".tmp_*"))


def test_crash_during_write_leaves_previous_loadable(tmp_path):
    """A process killed halfway through writing step 2 (os._exit, no cleanup) leaves step 1 usable."""
    code = textwrap.dedent(
        f"""
        import os, torch
        from llm.config import Config
        from llm.training import checkpoint as ckpt
        import sys
        sys.path.insert(0, {str(ROOT / "tests" / "training")!r})
        from trainer_helpers import trained_toy as _trained, save_toy as _save
        model, opt = _trained()
        cp = ckpt.Checkpointer({str(tmp_path)!r})
        _save(cp, 1, model, opt)
        real = ckpt._torch_save
        def dying(obj, file):
            real(obj, file)
            if file.name == "optimizer.pt":
                os._exit(9)  # the power goes out with model and optimizer written, marker not
        ckpt._torch_save = dying
        _save(cp, 2, model, opt)
        """
    )
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    cp = Checkpointer(tmp_path)
    assert list(cp.root.glob(".tmp_step_00000002"))  # the half-written one is there, but not a checkpoint
    assert [p.name for p in cp.complete()] == ["step_00000001"]
    model, opt = _trained(seed=5)
    folder, state, _ = cp.load("latest", model, opt, Config())
    assert folder.name == "step_00000001" and state["step"] == 1
    _save(cp, 3, model, opt)  # the next successful save sweeps the leftover
    assert not list(cp.root.glob(".tmp_*"))


def test_marker_lists_file_sizes(tmp_path):
    model, opt = _trained()
    path = _save(Checkpointer(tmp_path), 7, model, opt)
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 7
    assert set(marker["files"]) == {"model.safetensors", "optimizer.pt", "trainer.pt", "rank_00000.pt", "config.yaml"}


def test_saving_an_existing_step_replaces_it(tmp_path):
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    _save(cp, 4, model, opt)
    other, other_opt = _trained(seed=9)  # e.g. a run resumed from an older checkpoint reaching step 4 again
    path = _save(cp, 4, other, other_opt)
    assert cp.complete() == [path] and not list(cp.root.glob(".old_*"))
    assert torch.equal(load_model_weights(path)["lin.weight"], other.lin.weight)


def test_replacing_a_step_that_fails_midway_puts_the_old_one_back(tmp_path, monkeypatch):
    """Re-saving step N moves step_N aside, then renames the new folder in: if that second rename fails,
    the old step_N comes back (before, it was left as .old_step_N and pruned by the next save)."""
    model, opt = _trained()
    cp = Checkpointer(tmp_path)
    first = _save(cp, 5, model, opt)
    real = ckpt.os.replace

    def fail_on_new(src, dst):
        if str(src).endswith(".tmp_step_00000005"):
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_on_new)
    with pytest.raises(CheckpointError, match="step_00000005 is intact"):
        _save(cp, 5, *_trained(seed=3))
    monkeypatch.undo()
    assert cp.complete() == [first] and not list(cp.root.glob(".old_*"))
    assert torch.equal(load_model_weights(first)["lin.weight"], model.lin.weight)


def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    """A process killed after moving step_N aside and before renaming the new one in leaves .old_step_N
    (complete) and .tmp_step_N: a resume restores the old folder instead of finding nothing."""
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=1)
    path = _save(cp, 4, model, opt)
    ckpt.os.replace(path, cp.root / ".old_step_00000004")
    (cp.root / ".tmp_step_00000004").mkdir()
    assert cp.latest() is None
    folder, state, _ = cp.load("latest", *_trained(seed=1), Config())
    assert folder == path and state["step"] == 4 and not list(cp.root.glob(".old_*"))


def test_a_damaged_config_in_the_newest_checkpoint_falls_back(tmp_path):
    """A truncated config.yaml that still parses used to be reported as the user's config differing; it is
    a damaged checkpoint (its size no longer matches the marker), so 'latest' falls back past it."""
    model, opt = _trained()
    cp = Checkpointer(tmp_path, keep_last=5)
    _save(cp, 1, model, opt)
    newest = _save(cp, 2, model, opt)
    config_file = newest / "config.yaml"
    config_file.write_text("\n".join(config_file.read_text().splitlines()[:4]) + "\n")
    folder, state, _ = cp.load("latest", *_trained(seed=1), Config())
    assert folder.name == "step_00000001" and state["step"] == 1
