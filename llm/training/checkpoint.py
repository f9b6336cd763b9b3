"""Checkpoints that never lose work: write to a temporary folder, fsync, mark complete, rename.

Layout of ``<output_dir>/checkpoints/step_XXXXXXXX/``:

- ``model.safetensors``: the model (tied tensors stored once, their aliases in the file's metadata);
  under FSDP a ``model_dcp/`` torch.distributed.checkpoint folder holds model and optimiser shards instead;
- ``optimizer.pt``: optimiser state (not under FSDP, where it lives in ``model_dcp/``);
- ``trainer.pt``: step, tokens seen, schedule, non-finite counters (whatever the trainer hands over);
- ``rank_XXXXX.pt``: per-rank state: data-loader position and RNG states (python, numpy, torch, CUDA);
- ``config.yaml``: the resolved config;
- ``COMPLETE``: JSON with the step and every file's size, written last after everything was fsynced.

A folder counts as a checkpoint only when ``COMPLETE`` exists; the folder is renamed into place only
after that, so a crash at any moment leaves either the old set of checkpoints or the old set plus the
new one. Every ``.pt`` file is read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llm.config import Config, ConfigError, config_diff, load_config, save_config
from llm.training import distributed

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
DCP_DIR = "model_dcp"
_STEP_RE = re.compile(r"^step_(\d{8,})$")

# Config keys that may change between a checkpoint and its resumption: they steer logging, length,
# speed or output, not the state being resumed. Everything else must match (see check_config).
RESUMABLE_CHANGES = (
    "train_config.max_steps",
    "train_config.max_tokens",
    "train_config.output_dir",
    "train_config.checkpoint_interval",
    "train_config.keep_last_checkpoints",
    "train_config.keep_every_n_steps",
    "train_config.log_interval",
    "train_config.max_consecutive_nonfinite",
    "train_config.compile",
    "train_config.activation_checkpointing",
    "model_config.peer_config.log_expert_usage",
    "model_config.peer_config.log_freq",
    "model_config.peer_config.kernel",
    "model_config.peer_config.max_gather_mib",
    "model_config.mla_config.attention_backend",
    "model_config.mla_config.decode_backend",
    "dataset_config.prefetch_factor",
    "eval_config.",
    "wandb_config.",
    "ablation_config.",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable, or could not be written."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint this run cannot continue (another world size): falling back to an older
    checkpoint would not help, so it is never skipped."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_RE.match(path.name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------
# Reading the model alone
# ----------------------------------------------------------------------------------------


def load_model_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint folder (safetensors, or a DCP folder written under FSDP)."""
    path = Path(checkpoint_dir)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    if (path / MODEL_FILE).is_file():
        return _read_safetensors(path / MODEL_FILE)
    if (path / DCP_DIR).is_dir():
        return _read_dcp_model(path / DCP_DIR)
    raise CheckpointError(f"{path}: holds neither {MODEL_FILE} nor {DCP_DIR}/")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{file}: unreadable ({exc})") from None
    for alias, target in aliases.items():
        state[alias] = state[target]
    return state


def _read_dcp_model(dcp_dir: Path) -> dict[str, torch.Tensor]:
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(dcp_dir), str(out))
        state = torch.load(out, map_location="cpu", weights_only=True)
    return state["model"]


def _write_safetensors(model_state: dict[str, torch.Tensor], file: Path) -> None:
    """Save a state dict; tensors sharing storage (tied embeddings) are stored once with an alias."""
    from safetensors.torch import save_file

    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model_state.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in by_storage and t.numel() > 0:
            aliases[name] = by_storage[key]
            continue
        by_storage[key] = name
        unique[name] = t.contiguous().cpu()
    save_file(unique, str(file), metadata={"aliases": json.dumps(aliases)})


# ----------------------------------------------------------------------------------------
# RNG state as plain tensors/ints (numpy arrays would need unpickling)
# ----------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# Files: write + fsync
# ----------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_load(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcode, disallowed global: all mean "unreadable"
        raise CheckpointError(f"{file}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER
    }


# ----------------------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the whole training state as one unit (see the module docstring).

    Args:
        output_dir: the run directory; checkpoints go to ``<output_dir>/checkpoints``.
        keep_last: complete checkpoints kept, newest first.
        keep_every: also keep checkpoints whose step is a multiple of this (0 = none).
        info: this process's rank and world size.
        sharded: FSDP run: model and optimiser go through torch.distributed.checkpoint.
    """

    def __init__(
        self,
        output_dir: str | Path,
        keep_last: int = 3,
        keep_every: int = 0,
        info: distributed.DistInfo | None = None,
        sharded: bool = False,
    ) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.info = info or distributed.DistInfo()
        self.sharded = sharded

    # ---- discovery ------------------------------------------------------------------

    def step_dirs(self) -> list[Path]:
        """Every ``step_*`` folder, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted(dirs, key=lambda p: checkpoint_step(p))

    def complete(self) -> list[Path]:
        return [p for p in self.step_dirs() if (p / MARKER).is_file()]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    # ---- saving ---------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: Any,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        config: Config,
    ) -> Path:
        """Write checkpoint ``step`` on every rank (a collective); returns its folder.

        ``trainer_state`` is shared by all ranks (rank 0 writes it); ``rank_state`` is this rank's
        (data-loader position, ...); RNG states are added here. On any failure, on any rank, the
        temporary folder is removed, older checkpoints are untouched and ``CheckpointError`` is raised.
        """
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        ok, error = True, ""
        if self.info.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as exc:
                ok, error = False, str(exc)
        ok = distributed.all_true(ok)
        if ok:
            try:
                self._write_states(tmp, step, model, optimizer, trainer_state, rank_state, config)
            except Exception as exc:  # OSError, but also safetensors' and torch.save's own errors on a full disk
                ok, error = False, _describe_write_error(exc)
            ok = distributed.all_true(ok)
        if ok and self.info.is_main:
            try:
                self._finish(tmp, final, step)
            except Exception as exc:
                ok, error = False, _describe_write_error(exc)
        ok = distributed.all_true(ok)
        if not ok:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"saving checkpoint {final} failed ({error or 'on another rank'}); {kept}")
        if self.info.is_main:
            self._prune()
        distributed.barrier()
        return final

    def _write_states(
        self,
        tmp: Path,
        step: int,
        model: nn.Module,
        optimizer: Any,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        config: Config,
    ) -> None:
        rank = self.info.rank
        _torch_save({**rank_state, "rng": rng_state()}, tmp / f"rank_{rank:05d}.pt")
        if self.sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, _optimizers(optimizer))
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / DCP_DIR))
        if not self.info.is_main:
            return
        if not self.sharded:
            _write_safetensors(model.state_dict(), tmp / MODEL_FILE)
            _fsync_path(tmp / MODEL_FILE)
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save({**trainer_state, "step": step, "world_size": self.info.world_size}, tmp / "trainer.pt")
        save_config(config, tmp / "config.yaml")
        _fsync_path(tmp / "config.yaml")

    def _finish(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0, after every rank wrote: marker last, then the atomic rename, then fsync the parent."""
        for sub in [p for p in tmp.rglob("*") if p.is_file()]:
            _fsync_path(sub)
        marker = {"step": step, "world_size": self.info.world_size, "files": _file_sizes(tmp)}
        with open(tmp / MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        # A folder of the same step exists after resuming from an older checkpoint: the new one
        # replaces it (moved aside first, since a rename cannot replace a non-empty folder). If the second
        # rename fails the old one is put back; a crash between the two leaves it as .old_<name>, which
        # ``recover_replaced`` restores.
        old = self.root / f".old_{final.name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
        else:
            os.replace(tmp, final)
        _fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def recover_replaced(self) -> None:
        """Rank 0: put back a complete ``.old_step_N`` whose replacement never arrived (a crash between
        ``_finish``'s two renames); drop those that were replaced."""
        if not self.info.is_main or not self.root.is_dir():
            return
        leftovers = list(self.root.glob(".old_step_*"))
        for old in leftovers:
            final = self.root / old.name[len(".old_") :]
            if final.exists() or not (old / MARKER).is_file():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
                log.warning("restored checkpoint %s (left aside by an interrupted save)", final)
        if leftovers:  # the folder changed: make it durable (nothing to sync on every other call)
            _fsync_path(self.root)

    def set_aside_newer(self, step: int, also: list[Path]) -> Path | None:
        """Resuming from ``step`` while newer checkpoints exist (a rollback): move them, with copies of the
        files in ``also`` (the metrics log), into ``abandoned_after_step_<step>_<time>/``, so that
        ``latest``, pruning and the log follow the resumed run and nothing of the abandoned one is lost.

        Rank 0 moves; returns the folder (None where there was nothing to move, and on other ranks).
        """
        newer = [p for p in self.step_dirs() if checkpoint_step(p) > step]
        if not newer or not self.info.is_main:
            return None
        dest = self.root / f"abandoned_after_{step_dir_name(step)}_{time.strftime('%Y%m%d-%H%M%S')}"
        for n in itertools.count(2):  # two rollbacks within one second: a second folder, not an error
            if not dest.exists():
                break
            dest = dest.with_name(f"{dest.name.rsplit('.', 1)[0]}.{n}")
        dest.mkdir()
        for path in newer:
            os.replace(path, dest / path.name)
        for path in also:
            if path.is_file():
                shutil.copy2(path, dest / path.name)
        _fsync_path(self.root)
        return dest

    def _prune(self) -> None:
        done = self.complete()
        keep = set(done[-self.keep_last :])
        if self.keep_every > 0:
            keep |= {p for p in done if checkpoint_step(p) % self.keep_every == 0}
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):  # left by a crash
            shutil.rmtree(stale, ignore_errors=True)
        self.recover_replaced()

    # ---- loading --------------------------------------------------------------------

    def resolve(self, resume: str) -> list[Path]:
        """Candidate checkpoints for ``resume`` ('latest' or a path), best first."""
        self.recover_replaced()
        distributed.barrier()
        if resume == "latest":
            for path in self.step_dirs():
                if not (path / MARKER).is_file() and self.info.is_main:
                    log.warning("skipping incomplete checkpoint %s (no %s marker)", path, MARKER)
            return list(reversed(self.complete()))
        path = Path(resume)
        if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
            return list(reversed(Checkpointer(path, info=self.info).complete())) or _raise(
                f"--resume {resume}: the run directory holds no complete checkpoint"
            )
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        if not (path / MARKER).is_file():
            raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no {MARKER} marker); it cannot be used")
        return [path]

    def load(
        self,
        resume: str,
        model: nn.Module,
        optimizer: Any,
        config: Config,
    ) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """Restore model and optimiser from the checkpoint ``resume`` names; None if there is none.

        With ``resume='latest'`` an unreadable checkpoint is reported and the previous one is tried; when
        none is usable ``CheckpointError`` lists why (None only when there is no complete checkpoint). An
        explicitly named one that is unreadable, or any written by another world size, raises. A config that differs
        from the checkpoint's in a field that shapes the state raises ``ConfigError`` naming the fields.
        Returns (folder, trainer_state, this rank's state); the caller applies ``rank_state["rng"]``
        with ``set_rng_state`` once its own setup has stopped drawing random numbers.
        """
        candidates = self.resolve(resume)
        reasons = []
        for i, path in enumerate(candidates):
            try:
                verify_files(path)  # first: a damaged config.yaml is a damaged checkpoint, not a config error
                check_config(path, config)
                result = self._load_one(path, model, optimizer)
                error = ""
            except CheckpointMismatchError:
                raise
            except CheckpointError as exc:
                result, error = None, str(exc)
            if distributed.all_true(result is not None):
                return path, result[0], result[1]
            if resume != "latest":
                raise CheckpointError(error or f"{path}: unreadable on another rank")
            reasons.append(f"{path.name}: {error or 'unreadable on another rank'}")
            if self.info.is_main:
                later = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "no older one"
                log.warning("checkpoint %s is unusable (%s); %s", path.name, error or "on another rank", later)
        if candidates:  # starting over would overwrite the run's checkpoints and metrics: stop instead
            raise CheckpointError(
                f"--resume: none of the {len(candidates)} complete checkpoints under {self.root} can be loaded "
                f"({'; '.join(reasons)}); nothing was changed"
            )
        return None

    def _load_one(self, path: Path, model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        trainer_state = _torch_load(path / "trainer.pt")
        saved_world = trainer_state.get("world_size", 1)
        if saved_world != self.info.world_size:
            raise CheckpointMismatchError(
                f"{path}: written by {saved_world} processes, this run has {self.info.world_size}; "
                "exact resumption needs the same number (data shards and RNG are per rank)"
            )
        rank_state = _torch_load(path / f"rank_{self.info.rank:05d}.pt")
        if self.sharded:
            if not (path / DCP_DIR).is_dir():
                raise CheckpointError(f"{path}: no {DCP_DIR}/ (saved without FSDP); resume with distributed: ddp")
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            msd, osd = get_state_dict(model, _optimizers(optimizer))
            state = {"model": msd, "optimizer": osd}
            dcp.load(state, checkpoint_id=str(path / DCP_DIR))
            set_state_dict(model, _optimizers(optimizer), model_state_dict=msd, optim_state_dict=osd)
        else:
            weights = load_model_weights(path)
            optim_state = _torch_load(path / "optimizer.pt")
            try:
                model.load_state_dict(weights)
                optimizer.load_state_dict(optim_state)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0][:300]})") from None
        return trainer_state, rank_state


def check_config(path: Path, config: Config) -> None:
    """Raise ``ConfigError`` naming every differing field that is not in ``RESUMABLE_CHANGES``."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        raise CheckpointError(f"{path}: missing config.yaml")
    try:
        saved = load_config(saved_file)
    except ConfigError as exc:
        raise CheckpointError(f"{saved_file}: unreadable ({exc})") from None
    differing = [k for k in config_diff(saved, config) if not k.startswith(RESUMABLE_CHANGES)]
    if differing:
        raise ConfigError(
            f"config differs from checkpoint {path} in: {', '.join(differing)} "
            "(resume with the checkpoint's values, or start a new output_dir)"
        )


def find_model_checkpoint(path: str | Path) -> Path:
    """The checkpoint to read a model from: ``path`` itself when it is a complete checkpoint, else the newest
    intact checkpoint of run directory ``path`` (a truncated one is reported and an older one used, as
    ``--resume`` does). Used by evaluation, generation, export and analysis; raises ``CheckpointError``.
    """
    path = Path(path)
    if (path / MARKER).is_file():
        verify_files(path)
        return path
    for candidate in reversed(Checkpointer(path).complete()):
        try:
            verify_files(candidate)
            return candidate
        except CheckpointError as exc:
            log.warning("checkpoint %s is unusable (%s); trying an older one", candidate.name, exc)
    raise CheckpointError(
        f"{path}: neither a complete checkpoint (a step_XXXXXXXX folder with {MARKER}) "
        "nor a run directory holding an intact one"
    )


def verify_files(path: Path) -> None:
    """Raise ``CheckpointError`` unless every file the marker lists is present with its recorded size."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        expected = marker["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}/{MARKER}: unreadable ({exc})") from None
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} is {file.stat().st_size} bytes, expected {size} (truncated?)")


def _optimizers(optimizer: Any) -> Any:
    return tuple(optimizer.optimizers) if hasattr(optimizer, "optimizers") else optimizer


def _describe_write_error(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
        return f"disk full: {exc}"
    return str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"


def _raise(message: str) -> Any:
    raise CheckpointError(message)
