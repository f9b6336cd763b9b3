"""The training loop. It composes the components of ``llm/training`` and ``llm/utils``; it implements none.

``train(config, resume)`` builds tokenizer, model, optimiser, schedule, data, checkpointer, loggers and
the expert-usage tracker, optionally restores a checkpoint, runs the loop, then saves, evaluates and
prints a sample. One step = ``grad_accum_steps`` micro-batches per rank, one clipped optimiser update.

Robustness rules (issue 8): a non-finite gradient norm skips the update and is counted, and after
``max_consecutive_nonfinite`` in a row the run stops without overwriting the last good checkpoint;
SIGTERM/SIGINT finish the current step, checkpoint and exit; ``metrics.jsonl`` is always written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llm.config import Config, ConfigError, save_config
from llm.config.defaults import ModelConfig, TrainConfig
from llm.models.generation import prompt_token_ids
from llm.training import distributed
from llm.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_config,
    checkpoint_step,
    set_rng_state,
    verify_files,
)
from llm.training.distributed import autocast_dtype
from llm.training.metrics import METRICS_FILE, Throughput, build_logger, memory_gib, peak_flops
from llm.training.optim import build_optimizer, clip_grad_norm
from llm.training.schedule import apply_lr, build_schedule
from llm.utils.experts.tracking import ExpertUsageTracker

log = logging.getLogger("llm.train")


@dataclass
class TrainState:
    """Counters saved in every checkpoint (``trainer.pt``)."""

    step: int = 0  # optimiser steps taken (skipped non-finite steps included)
    tokens: int = 0  # training tokens consumed, all ranks
    nonfinite_steps: int = 0  # updates skipped because the gradient norm was NaN/inf
    consecutive_nonfinite: int = 0
    wandb_id: str = ""  # so a resumed run continues the same W&B run


@dataclass
class TrainResult:
    status: str  # completed | interrupted | nonfinite
    step: int
    tokens: int
    output_dir: str
    checkpoint: str | None = None
    val: dict[str, float] = field(default_factory=dict)
    sample: str | None = None


class LossModule(nn.Module):
    """What DDP and torch.compile wrap: ``forward`` is the model's loss, so DDP's gradient hooks fire."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None = None):
        """input_ids, labels, doc_ids (B, T) -> (scalar loss, parts)."""
        return self.model.loss(input_ids, labels, doc_ids)


def train(config: Config, resume: str | None = None) -> TrainResult:
    """Train ``config``; ``resume`` = None (fresh), 'latest' or a checkpoint/run folder."""
    tc, dc, mc = config.train_config, config.dataset_config, config.model_config
    check_world_size(config, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's, before anything is written
    refuse_fresh_run_over_checkpoints(tc.output_dir, resume)
    created = not Path(tc.output_dir).exists()
    out = prepare_output_dir(tc.output_dir)
    info = distributed.init_distributed(tc)
    try:
        from llm.data import build_tokenizer, build_train_loader
        from llm.models.foundation import FoundationModel

        seed_everything(tc.seed)  # identical model init on every rank
        tokenizer = build_tokenizer(dc)
        check_vocab(tokenizer.vocab_size, mc)
        model = FoundationModel(mc).to(info.device)
        loss_module = distributed.wrap_model(prepare_model(model, tc), model, tc, info)
        optimizer = build_optimizer(tc, model)
        total_steps = total_training_steps(tc, dc.seq_len, info.world_size)
        schedule = build_schedule(tc, total_steps)
        loader = build_train_loader(dc, tokenizer, tc.batch_size, info.rank, info.world_size)
        sharded = tc.distributed == "fsdp" and info.enabled
        checkpointer = Checkpointer(out, tc.keep_last_checkpoints, tc.keep_every_n_steps, info, sharded)
        tracker = ExpertUsageTracker(
            model.peer_modules(), mc.peer_config.product_key_dim, mc.peer_config.log_freq,
            out / "expert_usage", distributed.all_reduce_sum,
        )  # fmt: skip
        state, rng, restored = TrainState(), None, None
        if resume:
            state, rng, restored = restore(checkpointer, resume, model, optimizer, loader, tracker, config, info)
        logger = build_logger(config, info.is_main, total_steps, state.step if resume else None, state.wandb_id)
        state.wandb_id = logger.wandb_id or state.wandb_id
        describe_run(config, out, info, model, total_steps, state.step)
        # RNG last, after every setup step that might draw from it: a resumed run continues the exact
        # streams of the interrupted one; a fresh run starts from the seed (per rank: dropout differs).
        if rng is not None:
            set_rng_state(rng)
        else:
            seed_everything(tc.seed + info.rank)
        loop = Loop(
            config, info, model, loss_module, optimizer, schedule, tokenizer, loader, checkpointer, logger, tracker
        )
        loop.last_checkpoint = restored  # the step it holds is not saved again (a re-save replaces a folder)
        with StopSignals() as signals:
            status = loop.run(state, total_steps, signals)
            # still handled: a signal during the final evaluation must not kill the finished run (exit 143)
            signals.finishing = True
            result = loop.finish(state, status)
        logger.close()
        # Every rank reaches the end before any tears the process group down: a rank destroying it while
        # a peer's last collective is still in flight aborted with gloo ("terminate called ...").
        distributed.barrier()
        return result
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty run directory behind
            with contextlib.suppress(OSError):
                out.rmdir()  # only ever removes an empty directory
        raise
    finally:
        distributed.cleanup()


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


class Loop:
    """The per-step work of ``train``: accumulate, clip, update, log, track, evaluate, checkpoint."""

    def __init__(
        self, config, info, model, loss_module, optimizer, schedule, tokenizer, loader, checkpointer, logger, tracker
    ):
        self.config, self.tc = config, config.train_config
        self.info, self.model, self.loss_module, self.optimizer = info, model, loss_module, optimizer
        self.schedule, self.tokenizer, self.loader, self.checkpointer = schedule, tokenizer, loader, checkpointer
        self.logger, self.tracker = logger, tracker
        self.autocast_dtype = autocast_dtype(self.tc, info.device)
        self.tokens_per_step = (
            self.tc.batch_size * config.dataset_config.seq_len * self.tc.grad_accum_steps * info.world_size
        )
        self.batches: Iterator[dict[str, torch.Tensor]] | None = None
        self.last_checkpoint: Path | None = None
        self.warned_no_val = False
        # tables outside DDP's reducer (sparse_adam): averaged over the ranks by the loop itself
        self.sparse_tables = distributed.sparse_table_parameters(model) if isinstance(
            loss_module, nn.parallel.DistributedDataParallel
        ) else []

    def run(self, state: TrainState, total_steps: int, signals: StopSignals) -> str:
        from llm.utils.eval.size import flops_per_token

        peak = peak_flops(self.info.device)
        fpt = flops_per_token(self.config.model_config, self.config.dataset_config.seq_len)["training"]
        meter = Throughput(fpt, peak * self.info.world_size if peak else None, total_steps, state.step)
        meter.start(state.step, state.tokens)
        self.batches = iter(self.loader)
        stop_vote = distributed.DeferredVote()
        tc = self.tc
        while state.step < total_steps:
            lr = self.schedule.lr(state.step)
            apply_lr(self.optimizer, lr)
            loss, grad_norm, finite = self.train_step()
            state.step += 1
            state.tokens += self.tokens_per_step
            state.nonfinite_steps += not finite
            state.consecutive_nonfinite = 0 if finite else state.consecutive_nonfinite + 1
            if state.step % tc.log_interval == 0 or state.step == total_steps or not finite:
                self.log_step(state, loss, lr, grad_norm, meter)
            if state.consecutive_nonfinite >= tc.max_consecutive_nonfinite:
                return "nonfinite"
            if self.tracker.due(state.step):
                self.logger.log(self.tracker.collect(state.step, write_images=self.info.is_main), state.step)
            if self.config.eval_config.eval_interval and state.step % self.config.eval_config.eval_interval == 0:
                self.evaluate(state.step)
            # Not while updates are being skipped for non-finite losses: such a checkpoint would resume
            # into the same streak, and with few kept it could prune the last one from before it.
            if tc.checkpoint_interval and state.step % tc.checkpoint_interval == 0 and state.consecutive_nonfinite == 0:
                self.save(state)
            # Ranks agree on stopping through a deferred all-reduce (no host sync per step): a signal is
            # acted on DeferredVote.LAG steps later on every rank, well inside torchrun's 30 s grace period.
            if stop_vote.vote(signals.received is not None) and state.step < total_steps:
                return "interrupted"  # (a signal during the last step lets the run finish: save, evaluate)
        return "completed"

    def train_step(self) -> tuple[torch.Tensor, float, bool]:
        """One update over ``grad_accum_steps`` micro-batches: (mean loss, grad norm before clipping, finite)."""
        accum = self.tc.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.info.device)
        for micro in range(accum):
            batch = self.next_batch()
            with self.grad_sync(micro == accum - 1):
                with self.autocast():
                    loss, _ = self.loss_module(batch["input_ids"], batch["labels"], batch.get("doc_ids"))
                (loss / accum).backward()
            total += loss.detach().float()
        distributed.average_table_grads(self.sparse_tables)
        norm = clip_grad_norm([p for p in self.model.parameters() if p.grad is not None], self.tc.grad_clip)
        # the step's host sync (with sparse_adam under DDP also the tables' row counts, above): all ranks
        # see the same all-reduced norm
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        return total / accum, grad_norm, finite

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches, None)
        if batch is None:  # a finite stream: start the next pass
            self.batches = iter(self.loader)
            batch = next(self.batches)
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}

    def grad_sync(self, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if isinstance(self.loss_module, nn.parallel.DistributedDataParallel) and not sync:
            return self.loss_module.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def log_step(self, state: TrainState, loss: torch.Tensor, lr: float, grad_norm: float, meter: Throughput) -> None:
        mean_loss = float(distributed.all_reduce_sum(loss.reshape(1))) / self.info.world_size
        metrics: dict[str, Any] = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens}
        metrics["nonfinite_steps"] = state.nonfinite_steps
        metrics.update(meter.measure(state.step, state.tokens))
        metrics["memory_gib"] = memory_gib(self.info.device)
        if hasattr(self.loader, "mix_report") and len(getattr(self.loader.plan, "sources", [])) > 1:
            metrics.update(self.loader.mix_report())
        self.logger.log(metrics, state.step)

    def evaluate(self, step: int) -> dict[str, float]:
        from llm.data import build_val_loader
        from llm.utils.eval.perplexity import NO_HELD_OUT_DATA, evaluate_perplexity

        dc = self.config.dataset_config
        val = build_val_loader(dc, self.tokenizer, self.tc.batch_size, self.info.rank, self.info.world_size)
        result = evaluate_perplexity(
            self.model, val, self.config.eval_config.eval_batches, self.info.device, self.autocast_dtype
        )
        scored = result["tokens"] > 0
        if not scored and not self.warned_no_val:  # nothing held out: say why, once
            say(self.info, f"warning: {NO_HELD_OUT_DATA}; no held-out loss is reported")
            self.warned_no_val = True
        # logged either way (null without held-out tokens): the record marks that the evaluation ran,
        # which is how the ablation runner knows a run reached its end
        val = {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        self.logger.log({k: v if scored else None for k, v in val.items()}, step)
        return result

    def save(self, state: TrainState) -> Path:
        trainer_state = {**asdict(state), "schedule": self.schedule.state_dict()}
        rank_state = {"data": self.loader.state_dict(), "experts": self.tracker.state_dict()}
        path = self.checkpointer.save(state.step, self.model, self.optimizer, trainer_state, rank_state, self.config)
        self.last_checkpoint = path
        if self.info.is_main and hasattr(self.logger, "log_checkpoint"):
            self.logger.log_checkpoint(path, state.step)
        return path

    def finish(self, state: TrainState, status: str) -> TrainResult:
        """Final checkpoint (not after non-finite losses: the last good one stays), evaluation, sample."""
        out = self.tc.output_dir
        result = TrainResult(status, state.step, state.tokens, out)
        if status == "nonfinite":
            good = self.checkpointer.latest()
            say(
                self.info,
                f"stopped: {state.consecutive_nonfinite} consecutive non-finite losses at step {state.step} "
                f"({state.nonfinite_steps} skipped in all); last good checkpoint: {good or 'none'}",
            )
            result.checkpoint = str(good) if good else None
            return result
        saved = self.last_checkpoint is not None and checkpoint_step(self.last_checkpoint) == state.step
        result.checkpoint = str(self.last_checkpoint if saved else self.save(state))
        if status == "interrupted":
            say(self.info, f"interrupted at step {state.step}; checkpoint {result.checkpoint}; continue with --resume")
            return result
        result.val = self.evaluate(state.step)
        if result.val["tokens"]:
            say(self.info, f"held-out loss {result.val['loss']:.4f}, perplexity {result.val['perplexity']:.2f}")
        result.sample = self.sample()
        if result.sample is not None:
            say(self.info, f"sample: {result.sample}")
        return result

    def sample(self) -> str | None:
        ec, tokenizer = self.config.eval_config, self.tokenizer
        if not ec.sample_prompts or ec.sample_tokens == 0:
            return None
        # Under FSDP every rank must run the forwards; otherwise rank 0 alone generates.
        if not (self.info.is_main or self.checkpointer.sharded):
            return None
        generator = torch.Generator(self.info.device).manual_seed(self.tc.seed)
        prompts = prompt_token_ids(tokenizer, ec.sample_prompts, self.config.dataset_config.add_bos)
        with self.autocast():
            new = self.model.generate(
                prompts, ec.sample_tokens, temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p,
                stop_ids=[tokenizer.eos_id], generator=generator,
            )  # fmt: skip
        return "\n".join(p + tokenizer.decode(n) for p, n in zip(ec.sample_prompts, new, strict=True))


# ----------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------


def refuse_fresh_run_over_checkpoints(output_dir: str, resume: str | None) -> None:
    """A fresh run would overwrite metrics.jsonl and prune the old, higher-numbered checkpoints in its
    favour: refuse rather than lose work."""
    previous = None if resume else Checkpointer(output_dir).latest()
    if previous is not None:
        raise ConfigError(
            f"train_config.output_dir: {output_dir} already holds checkpoints (latest {previous.name}); "
            "continue with --resume, or choose another output_dir"
        )


def check_world_size(config: Config, world_size: int) -> None:
    """Settings that need a given process count: the row-sparse table optimiser finds touched rows in
    whole tables, which FSDP shards (under DDP the loop averages the tables' row gradients itself)."""
    if (
        world_size > 1
        and config.train_config.distributed == "fsdp"
        and config.model_config.peer_config.table_optimizer == "sparse_adam"
    ):
        raise ConfigError(
            f"model_config.peer_config.table_optimizer: 'sparse_adam' needs whole expert tables, which "
            f"train_config.distributed: fsdp shards over this run's {world_size} processes; use distributed: ddp "
            "or table_optimizer: adamw"
        )


def preflight(config: Config, resume: str | None, world_size: int = 1) -> None:
    """The checks that need neither a process group nor a model (``scripts/train.py --check``, which
    ``scripts/train.sh`` runs once before torchrun, so a bad input is one line and exit 2 instead of one
    error per rank and torchrun's traceback): the output directory against ``resume``, the tokenizer
    (a hub tokenizer that cannot be had fails here) and the vocabulary size."""
    from llm.data import build_tokenizer

    check_world_size(config, world_size)
    refuse_fresh_run_over_checkpoints(config.train_config.output_dir, resume)
    check_resume_target(config, resume)
    check_vocab(build_tokenizer(config.dataset_config).vocab_size, config.model_config)


def check_resume_target(config: Config, resume: str | None) -> None:
    """The checkpoint ``resume`` names exists and is complete, and the config matches the one the resume
    would load (the newest intact one for 'latest'); raises ``CheckpointError`` / ``ConfigError``."""
    if not resume:
        return
    for path in Checkpointer(config.train_config.output_dir).resolve(resume):
        try:
            verify_files(path)
        except CheckpointError:
            continue  # the resume falls back past it (or reports every candidate)
        check_config(path, config)
        return


def prepare_output_dir(path: str) -> Path:
    """Create the run directory and prove it is writable (a clear error now, not at the first checkpoint)."""
    out = Path(path)
    probe = out / f".write_test_{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train_config.output_dir: {path!r} is not writable ({exc.strerror or exc})") from None
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every device's generator, CUDA included


def check_vocab(tokenizer_vocab: int, mc: ModelConfig) -> None:
    if tokenizer_vocab > mc.vocab_size:
        raise ConfigError(
            f"model_config.vocab_size: {mc.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); set it to at least {tokenizer_vocab}"
        )


def prepare_model(model: nn.Module, tc: TrainConfig) -> LossModule:
    """The module the loop calls: activation checkpointing per block, then (optionally) a compiled loss.

    Both keep parameter names unchanged. Only the training loss is compiled, not ``model`` itself:
    evaluation and generation (variable lengths, KV caches) stay eager, which measured as the
    robust choice (Inductor failed on the cached decode path with torch 2.11, H200, 2026-11-27).
    """
    if tc.activation_checkpointing:
        from torch.utils.checkpoint import checkpoint

        for block in model.layers:
            # Replace the bound forward on the instance, not the module: state-dict keys stay the same,
            # so checkpoints move freely between runs with and without it.
            def forward(*args, _inner=block.forward, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward
    loss_module = LossModule(model)
    if tc.compile:
        loss_module.compile()
    return loss_module


def total_training_steps(tc: TrainConfig, seq_len: int, world_size: int) -> int:
    """``max_steps``, or enough steps for ``max_tokens`` tokens when that is set."""
    if tc.max_tokens > 0:
        per_step = tc.batch_size * seq_len * tc.grad_accum_steps * world_size
        return max(1, math.ceil(tc.max_tokens / per_step))
    return tc.max_steps


def restore(checkpointer, resume, model, optimizer, loader, tracker, config, info) -> tuple[TrainState, Any, Path | None]:
    """Load the checkpoint ``resume`` names into the components; (state, this rank's RNG state, its folder)."""
    loaded = checkpointer.load(resume, model, optimizer, config)
    if loaded is None:
        say(info, f"--resume: no checkpoint under {checkpointer.root}; starting from step 0")
        return TrainState(), None, None
    path, trainer_state, rank_state = loaded
    aside = checkpointer.set_aside_newer(int(trainer_state["step"]), [checkpointer.root.parent / METRICS_FILE])
    if aside is not None:
        say(info, f"resuming from an older checkpoint: the newer ones and a copy of {METRICS_FILE} moved to {aside}")
    loader.load_state_dict(rank_state["data"])
    tracker.load_state_dict(rank_state.get("experts", {}))
    fields = TrainState.__dataclass_fields__
    state = TrainState(**{k: v for k, v in trainer_state.items() if k in fields})
    say(info, f"resumed from {path} (step {state.step}, {state.tokens:,} tokens)")
    return state, rank_state["rng"], path


def describe_run(
    config: Config, out: Path, info: distributed.DistInfo, model: nn.Module, total_steps: int, start: int
) -> None:
    """Rank 0: the resolved config and the run's provenance (commit, versions, device) in the run directory."""
    if not info.is_main:
        return
    save_config(config, out / "config.yaml")
    meta = {
        "commit": _git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "world_size": info.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "total_steps": total_steps,
        "start_step": start,
    }
    (out / "run_info.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    print(
        f"run {out}: {meta['parameters']:,} parameters on {meta['device']} x{info.world_size}, "
        f"steps {start}->{total_steps}, torch {meta['torch']}, commit {meta['commit']}",
        flush=True,
    )


def say(info: distributed.DistInfo, message: str) -> None:
    if info.is_main:
        print(message, flush=True)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
        return (sha.stdout.strip() or "none") + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed: reported as None, never fatal
        return None


class StopSignals:
    """SIGTERM/SIGINT set ``received``; the loop checkpoints after the current step. A second SIGINT aborts."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.finishing = False  # training is over: the last checkpoint is written, evaluation runs
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked data-loader worker (a terminal's Ctrl-C reaches it too): the trainer stops it
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        then = "finishing the final evaluation" if self.finishing else "checkpointing after this step"
        print(f"received {self.received}: {then} (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
