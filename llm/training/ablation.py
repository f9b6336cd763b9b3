"""Ablation studies: variants of a base config, each trained in its own process, ranked by held-out loss.

An axis maps variant names to dotted-key overrides. The SPEC's five axes are built in and derived from
the base config (``builtin_axes``); ``ablation_config.axes`` adds axes or replaces a built-in one by name:

- ``data_mix``: every usable mix of the datasets file (``--custom-datasets`` picks the file); a mix whose
  local files are missing is skipped with a note. Each variant sets ``datasets_file`` and ``mix``.
- ``expert_count``: every product-key part divided by 4, 2, 1, so N = (n/4)^P, (n/2)^P, n^P (1024^2 base:
  256^2, 512^2, 1024^2). Not larger: the base is presumably sized to fit memory already.
- ``expert_size``: expert_hidden_size m in {1, 4, 16} at equal total expert parameters (N*m constant,
  N re-split into P balanced parts); k stays, so active expert parameters grow with m.
- ``product_dims``: P in {2, 3, 4} parts with the same N, split as evenly as N's factors allow;
  query_dim rounded up to a multiple of P where needed.
- ``num_heads``: h in {h/2, h, 2h} with k scaled to keep h*k (experts read per token) constant.

Built-in variants are functions of the config they apply to, so grid combinations compose in the order
above (expert_size then re-splits expert_count's N). A variant impossible for a config (a part not
divisible, h*k not divisible by h, fewer experts than k) is skipped with a note.

Strategies: ``one_at_a_time`` trains the base config plus each variant alone (variants equal to the base
are the baseline run), so runs grow with the sum of the axes' sizes; ``grid`` trains every combination.

Layout of ``output_dir``: ``ablation.json`` (the plan and each run's status; ``--resume`` reads it),
``base_config.yaml``, one folder per run (``config.yaml``, ``train.log``, ``metrics.jsonl``,
``checkpoints/``), and ``results.csv`` / ``results.md``, rewritten after every finished run.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm.config import Config, ConfigError, dump_config, from_dict, load_config, save_config, to_dict, validate_config
from llm.config.loader import flatten, read_yaml_mapping, set_dotted
from llm.training.ablation_report import (
    BASE,
    LENGTH_KEYS,
    format_count,
    ranking_table,
    read_metrics,
    write_summary,
)

BUILTIN_AXES = ("data_mix", "expert_count", "expert_size", "product_dims", "num_heads")
STRATEGIES = ("one_at_a_time", "grid")
MANIFEST = "ablation.json"
REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
PEER = "model_config.peer_config."

# A variant: config -> overrides, or a reason it does not apply to that config.
VariantFn = Callable[[Config], "dict[str, Any] | str"]


class AblationError(ValueError):
    """A study that cannot be planned or resumed; the message is one line."""


@dataclass
class PlannedRun:
    name: str  # folder under output_dir: "baseline" or axis=variant pairs joined by "+"
    coords: dict[str, str]  # axis -> variant (BASE where the base config matches no variant)
    overrides: dict[str, Any]  # dotted key -> value, over the base config
    params_total: int = 0
    params_active: int = 0  # per token
    status: str = "pending"  # pending | running | completed | interrupted | failed
    attempts: int = 0
    returncode: int | None = None
    error: str = ""  # tail of train.log after the last failed attempt
    wall_s: float = 0.0  # seconds spent training, all attempts


@dataclass
class Study:
    base_config: str
    strategy: str
    axes: dict[str, list[str]]  # axis -> variant names in plan order
    base_variants: dict[str, str]  # axis -> the variant equal to the base config
    tokens: int  # train_config.max_tokens of every run (0 = the base config's length)
    notes: list[str] = field(default_factory=list)
    runs: list[PlannedRun] = field(default_factory=list)


# ----------------------------------------------------------------------------------------
# Axes
# ----------------------------------------------------------------------------------------


def balanced_factors(n: int, parts: int) -> list[int] | None:
    """``parts`` factors >= 2 of ``n``, as equal as possible, largest first; None when there are none."""
    if parts == 1:
        return [n] if n >= 2 else None
    target = n ** (1.0 / parts)
    divisors = [d for d in range(2, int(math.isqrt(n)) + 1) if n % d == 0]
    divisors = sorted(set(divisors + [n // d for d in divisors]), key=lambda d: (abs(d - target), -d))
    for d in divisors:
        rest = balanced_factors(n // d, parts - 1)
        if rest is not None:
            return sorted([d, *rest], reverse=True)
    return None


def _experts(n: int, parts: int, k: int) -> dict[str, Any] | str:
    dims = balanced_factors(n, parts) if n >= k else None
    if dims is None:
        return f"{n} experts cannot be split into {parts} parts >= 2 holding k={k}"
    return {PEER + "num_experts": n, PEER + "product_key_dim": dims}


def _scale_parts(divisor: int) -> VariantFn:
    def fn(cfg: Config) -> dict[str, Any] | str:
        pc = cfg.model_config.peer_config
        if any(d % divisor or d // divisor < 2 for d in pc.product_key_dim):
            return f"product_key_dim {pc.product_key_dim} is not divisible into parts >= 2 by {divisor}"
        dims = [d // divisor for d in pc.product_key_dim]
        if math.prod(dims) < pc.num_experts_per_tok:
            return f"{math.prod(dims)} experts < k={pc.num_experts_per_tok}"
        return {PEER + "num_experts": math.prod(dims), PEER + "product_key_dim": dims}

    return fn


def _expert_size(m: int) -> VariantFn:
    def fn(cfg: Config) -> dict[str, Any] | str:
        pc = cfg.model_config.peer_config
        total = pc.num_experts * pc.expert_hidden_size  # expert hidden units, kept constant
        if total % m:
            return f"{total} expert hidden units are not divisible by m={m}"
        split = _experts(total // m, len(pc.product_key_dim), pc.num_experts_per_tok)
        return split if isinstance(split, str) else {**split, PEER + "expert_hidden_size": m}

    return fn


def _product_dims(parts: int) -> VariantFn:
    def fn(cfg: Config) -> dict[str, Any] | str:
        pc = cfg.model_config.peer_config
        split = _experts(pc.num_experts, parts, pc.num_experts_per_tok)
        if isinstance(split, str):
            return split
        return {**split, PEER + "query_dim": -(-pc.query_dim // parts) * parts}

    return fn


def _num_heads(h: int) -> VariantFn:
    def fn(cfg: Config) -> dict[str, Any] | str:
        pc = cfg.model_config.peer_config
        reads = pc.num_heads * pc.num_experts_per_tok
        if reads % h or not 1 <= reads // h <= pc.num_experts:
            return f"h*k={reads} does not give an integer k in [1, N] for h={h}"
        return {PEER + "num_heads": h, PEER + "num_experts_per_tok": reads // h}

    return fn


def _data_mix(datasets_file: str, mix: str, base: Config) -> VariantFn:
    extra = {"dataset_config.sources": []} if base.dataset_config.sources else {}
    return lambda cfg: {"dataset_config.datasets_file": datasets_file, "dataset_config.mix": mix, **extra}


def builtin_axes(base: Config, datasets_file: str | None = None) -> tuple[dict[str, dict[str, VariantFn]], list[str]]:
    """The SPEC's axes derived from ``base`` (rules in the module docstring); (axes, notes on skipped variants)."""
    pc, notes = base.model_config.peer_config, []
    axes: dict[str, dict[str, VariantFn]] = {"data_mix": {}, "expert_count": {}, "expert_size": {}}
    axes.update(product_dims={}, num_heads={})
    for divisor in (4, 2, 1):
        axes["expert_count"][f"N{math.prod(d // divisor for d in pc.product_key_dim)}"] = _scale_parts(divisor)
    for m in (1, 4, 16):
        axes["expert_size"][f"m{m}"] = _expert_size(m)
    for parts in (2, 3, 4):
        axes["product_dims"][f"P{parts}"] = _product_dims(parts)
    for h in sorted({max(1, pc.num_heads // 2), pc.num_heads, 2 * pc.num_heads}):
        axes["num_heads"][f"h{h}"] = _num_heads(h)
    file = datasets_file or base.dataset_config.datasets_file
    if datasets_file and not Path(datasets_file).is_file():
        raise AblationError(f"--custom-datasets: {datasets_file!r} does not exist")
    if datasets_file and Path(datasets_file).resolve() == Path(base.dataset_config.datasets_file).resolve():
        file = base.dataset_config.datasets_file  # the same file: keep the base's spelling, so it matches
    mixes = read_yaml_mapping(file).get("mixes") if Path(file).is_file() else None
    if not isinstance(mixes, dict) or not mixes:
        if datasets_file:
            raise AblationError(f"--custom-datasets: {datasets_file} has no top-level 'mixes' mapping")
        notes.append(f"data_mix: {file} holds no mixes; axis empty")
    for mix in mixes or {}:
        problem = data_problem(file, mix)
        if problem:
            notes.append(f"data_mix: skipped mix {mix!r}: {problem}")
        else:
            axes["data_mix"][str(mix)] = _data_mix(file, str(mix), base)
    return axes, notes


def data_problem(datasets_file: str, mix: str) -> str | None:
    """Why mix ``mix`` of ``datasets_file`` cannot train here (unparsable, local files missing), or None.

    The hub's reachability is not a property of the plan (an offline machine may plan a study that a
    connected one runs); ``data_unreachable`` checks it before training."""
    from llm.data.sources import load_mix, source_problem  # the data package is heavy; only planning needs it

    try:
        sources = load_mix(datasets_file, mix)
    except ConfigError as exc:
        return str(exc)
    return next((p for p in (source_problem(s, check_hub=False) for s in sources) if p), None)


def study_axes(
    base: Config, datasets_file: str | None, names: Sequence[str] | None
) -> tuple[dict[str, dict[str, VariantFn]], list[str]]:
    """Built-in axes with the config's axes over them (one of the same name replaces), restricted to ``names``."""
    axes, notes = builtin_axes(base, datasets_file)
    for axis, variants in base.ablation_config.axes.items():
        if axis == "data_mix" and datasets_file:
            continue  # --custom-datasets on the command line beats the config's data_mix axis
        axes[axis] = {str(v): (lambda cfg, ov=ov: copy.deepcopy(ov)) for v, ov in variants.items()}
    if names:
        unknown = [n for n in names if n not in axes]
        if unknown:
            raise AblationError(f"--axes: unknown axis {unknown[0]!r}; allowed: {', '.join(axes)}")
        axes = {a: v for a, v in axes.items() if a in names}
    empty = [a for a, v in axes.items() if not v]
    if names and empty:
        raise AblationError(f"--axes: axis {empty[0]!r} has no usable variant for this base config")
    return {a: v for a, v in axes.items() if v}, [n for n in notes if n.split(":")[0] in axes]


# ----------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------


def with_overrides(config: Config, overrides: dict[str, Any], validate: bool = True) -> Config:
    tree = to_dict(config)
    for key, value in overrides.items():
        set_dotted(tree, key, copy.deepcopy(value))
    result = from_dict(Config, tree)
    if validate:
        validate_config(result)
    return result


def data_unreachable(configs: dict[str, Config]) -> str | None:
    """The first run whose data cannot be had here (hub streamed while offline, local paths matching no
    file), as ``"run NAME: why"``, or None; each distinct dataset config is checked once."""
    from llm.data.sources import check_sources_reachable

    checked: set[str] = set()
    for name, config in configs.items():
        key = json.dumps(to_dict(config.dataset_config), sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        try:
            check_sources_reachable(config.dataset_config)
        except (ValueError, FileNotFoundError) as exc:
            return f"run {name}: {exc}"
    return None


def plan_study(
    base: Config,
    base_path: str,
    output_dir: str | Path,
    axes: Sequence[str] | None = None,
    strategy: str | None = None,
    tokens: int | None = None,
    datasets_file: str | None = None,
) -> tuple[Study, dict[str, Config]]:
    """The runs of a study and their resolved configs, every one validated; a bad one raises naming the run."""
    strategy = strategy or base.ablation_config.strategy
    if strategy not in STRATEGIES:
        raise AblationError(f"--strategy: got {strategy!r}; allowed: {' | '.join(STRATEGIES)}")
    tokens = base.ablation_config.tokens_per_run if tokens is None else tokens
    if tokens < 0:
        raise AblationError(f"--tokens: got {tokens}; must be >= 0 (0 = the base config's length)")
    chosen, notes = study_axes(base, datasets_file, axes)
    if not chosen:
        raise AblationError("no axis to ablate: the base config declares none and no built-in axis applies")
    base_variants: dict[str, str] = {}
    variant_names: dict[str, list[str]] = {}
    for axis, variants in chosen.items():
        variant_names[axis] = []
        for variant, fn in variants.items():
            ov = fn(base)
            if isinstance(ov, str):
                notes.append(f"{axis}={variant} skipped: {ov}")
                continue
            variant_names[axis].append(variant)
            if axis not in base_variants and to_dict(with_overrides(base, ov, validate=False)) == to_dict(base):
                base_variants[axis] = variant
    entries = _combine(base, chosen, variant_names, base_variants, strategy, notes)
    study = Study(base_path, strategy, variant_names, base_variants, tokens, notes)
    configs: dict[str, Config] = {}
    seen: dict[str, str] = {}
    for name, coords, overrides in entries:
        run_dir = Path(output_dir) / name
        try:
            config = with_overrides(base, overrides)
            length_axis = bool(LENGTH_KEYS & set(overrides))
            if tokens > 0 and length_axis:
                notes.append(f"run {name}: its axis sets the run length, so --tokens/tokens_per_run does not apply")
            config = with_overrides(config, run_settings(config, run_dir, coords, 0 if length_axis else tokens))
        except ConfigError as exc:
            raise AblationError(f"run {name}: {exc}") from None
        dc = config.dataset_config
        problem = None if dc.sources or dc.pretokenized_dir else data_problem(dc.datasets_file, dc.mix)
        if problem:
            raise AblationError(f"run {name}: {problem}")
        key = dump_config(with_overrides(base, overrides, validate=False))  # the science, not the bookkeeping
        if key in seen:
            notes.append(f"{name} equals {seen[key]}; trained once")
            continue
        seen[key] = name
        from llm.utils.eval.size import count_parameters

        report = count_parameters(config.model_config)
        study.runs.append(PlannedRun(name, coords, overrides, report.total, report.active))
        configs[name] = config
    return study, configs


def _combine(base, chosen, variant_names, base_variants, strategy, notes) -> list[tuple[str, dict, dict]]:
    """(run name, coordinates, overrides) per run of ``strategy``."""
    home = {axis: base_variants.get(axis, BASE) for axis in chosen}
    if strategy == "one_at_a_time":
        entries = [("baseline", dict(home), {})]
        for axis, names in variant_names.items():
            for variant in names:
                if variant != base_variants.get(axis):
                    entries.append((f"{axis}={_slug(variant)}", {**home, axis: variant}, chosen[axis][variant](base)))
        return entries
    entries = []
    for combo in itertools.product(*variant_names.values()):
        coords = dict(zip(variant_names, combo, strict=True))
        config, overrides = base, {}
        for axis, variant in coords.items():
            ov = chosen[axis][variant](config)  # built-in variants read what earlier axes set
            if isinstance(ov, str):
                notes.append(f"grid point {coords} skipped: {axis}={variant}: {ov}")
                break
            overrides.update(ov)
            config = with_overrides(config, ov, validate=False)
        else:
            before, after = flatten(to_dict(base)), flatten(to_dict(config))
            overrides = {k: v for k, v in overrides.items() if before.get(k) != after.get(k)}  # drop no-ops
            entries.append(("+".join(f"{a}={_slug(v)}" for a, v in coords.items()), coords, overrides))
    return entries


def run_settings(config: Config, run_dir: Path, coords: dict[str, str], tokens: int) -> dict[str, Any]:
    """Bookkeeping overrides of one run: its folder, length, W&B name and tags."""
    wc = config.wandb_config
    settings: dict[str, Any] = {"train_config.output_dir": str(run_dir)}
    if tokens > 0:
        settings["train_config.max_tokens"] = tokens
    if coords:
        settings["wandb_config.run_name"] = f"{run_dir.parent.name}/{run_dir.name}"
        extra = ["ablation", *(f"{a}={v}" for a, v in coords.items())]
        settings["wandb_config.tags"] = list(dict.fromkeys([*wc.tags, *extra]))
    return settings


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


# ----------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------


def save_study(study: Study, study_dir: Path) -> None:
    tmp = study_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(asdict(study), indent=1), encoding="utf-8")
    tmp.replace(study_dir / MANIFEST)


def load_study(study_dir: Path) -> Study:
    path = study_dir / MANIFEST
    if not path.is_file():
        raise AblationError(
            f"--resume: no study in {str(study_dir)!r} ({MANIFEST} missing); start one without --resume"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        runs = [PlannedRun(**r) for r in raw.pop("runs")]
        return Study(**raw, runs=runs)
    except (ValueError, TypeError, KeyError) as exc:
        raise AblationError(f"{path}: not a study manifest ({exc})") from None


# ----------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------


def run_finished(run_dir: Path) -> bool:
    """The trainer reached its last step and evaluated there (an interrupted run has no such record)."""
    try:
        total = json.loads((run_dir / "run_info.json").read_text(encoding="utf-8"))["total_steps"]
    except (OSError, ValueError, KeyError):
        return False
    return read_metrics(run_dir)["val_step"] == total


def _cuda_device_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count()


def _devices(gpus: int) -> list[str]:
    """The device ids the runs are spread over: CUDA_VISIBLE_DEVICES's, else 0 .. gpus-1 of this machine.

    Without a CUDA device (none on the machine, or CUDA_VISIBLE_DEVICES set but empty, which each run
    inherits) ``gpus`` CPU trainings run at a time; a machine with fewer CUDA devices than ``gpus`` is
    refused (the extra runs would not see a device).
    """
    if gpus < 1:
        raise AblationError(f"--gpus: got {gpus}; must be >= 1")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():  # GPUs hidden: each run gets CUDA_VISIBLE_DEVICES=""
        return [""] * gpus
    if visible:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
        if len(devices) < gpus:
            raise AblationError(f"--gpus: got {gpus}; CUDA_VISIBLE_DEVICES={visible!r} lists only {len(devices)}")
        return devices[:gpus]
    count = _cuda_device_count()
    if 0 < count < gpus:
        raise AblationError(f"--gpus: got {gpus}; this machine has {count} CUDA device(s)")
    return [str(i) for i in range(gpus)]  # with no CUDA device at all these are CPU slots


def _cpu_only() -> bool:
    """No CUDA device for the runs: CUDA_VISIBLE_DEVICES set but empty, or none on this machine."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return not visible.strip()
    return _cuda_device_count() == 0


class Runner:
    """Trains the unfinished runs of a study, one per device at a time (CUDA_VISIBLE_DEVICES=device)."""

    def __init__(self, study: Study, study_dir: Path, devices: list[str], say: Callable[[str], None] = print) -> None:
        self.study, self.dir, self.say = study, study_dir, say
        self.devices: queue.Queue[str] = queue.Queue()
        for device in devices:
            self.devices.put(device)
        self.gpus = len(devices)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: set[subprocess.Popen] = set()

    def run(self) -> None:
        finished = {r.name for r in self.study.runs if run_finished(self.dir / r.name)}
        for r in self.study.runs:  # finished after the manifest was last saved (the runner was killed then)
            if r.name in finished and r.status != "completed":
                r.status, r.error = "completed", ""
        todo = [r for r in self.study.runs if r.name not in finished]
        self.say(f"{len(self.study.runs) - len(todo)} of {len(self.study.runs)} runs already finished")
        handlers = self._install_signals()
        try:
            with ThreadPoolExecutor(self.gpus) as pool:
                futures = [pool.submit(self._train, run) for run in todo]
                while not all(f.done() for f in futures):
                    wait_futures(futures, timeout=0.5)  # short waits keep the main thread free for signals
                for f in futures:
                    f.result()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handle(signum: int, frame: Any) -> None:
            self.say(f"received {signal.Signals(signum).name}: asking running runs to checkpoint; none start")
            self.stop.set()
            with self.lock:
                for proc in self.procs:
                    proc.send_signal(signal.SIGTERM)  # the trainer finishes its step and checkpoints

        # SIGHUP too: a closed terminal must not orphan the trainers (they run in their own sessions)
        return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _train(self, run: PlannedRun) -> None:
        if self.stop.is_set():
            return
        device = self.devices.get()
        try:
            if not self.stop.is_set():
                self._attempt(run, device)
        finally:
            self.devices.put(device)

    def _attempt(self, run: PlannedRun, device: str) -> None:
        run_dir = self.dir / run.name
        # The run's folder as this runner sees it: config.yaml holds the path as planned, which is wrong
        # for a study resumed from another working directory, or copied or moved since.
        cmd = [sys.executable, str(TRAIN_SCRIPT), "--config", str(run_dir / "config.yaml"),
               "--set", f"train_config.output_dir={run_dir.resolve()}"]  # fmt: skip
        if (run_dir / "checkpoints").is_dir():
            cmd.append("--resume")  # continues from the latest complete checkpoint (none: from step 0)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        with self.lock:
            run.status, run.attempts = "running", run.attempts + 1
            save_study(self.study, self.dir)
        self.say(
            f"start {run.name} (attempt {run.attempts}, device {device or 'cpu'}){' from checkpoint' * ('--resume' in cmd)}"
        )
        log_path = run_dir / "train.log"
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"=== attempt {run.attempts}: CUDA_VISIBLE_DEVICES={device} {' '.join(cmd)}\n")
            log.flush()
            start = log.tell()
            began = time.monotonic()
            # Own session: a terminal Ctrl-C reaches the runner alone, which forwards one SIGTERM.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self.lock:
                self.procs.add(proc)
            rc = proc.wait()
        with self.lock:
            self.procs.discard(proc)
            run.wall_s += time.monotonic() - began
            run.returncode = rc
            if run_finished(run_dir):  # also when a stop signal arrived as it was finishing (rc != 0)
                run.status, run.error = "completed", ""
            elif rc == 0 or self.stop.is_set():
                run.status, run.error = "interrupted", ""
            else:
                run.status, run.error = "failed", _tail(log_path, start)
            save_study(self.study, self.dir)
            rows, _ = write_summary(self.study, self.dir)
        result = next((r for r in rows if r["run"] == run.name), {})
        loss = result.get("val_loss") if result.get("val_loss") is not None else result.get("train_loss")
        detail = f"loss {loss:.4f}" if isinstance(loss, float) else f"exit {rc}"
        self.say(f"{run.status} {run.name} in {run.wall_s:.0f} s: {detail}")


def _tail(path: Path, start: int, lines: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        return "\n".join(f.read().splitlines()[-lines:])


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def ablate(
    base_config: str | None = None,
    overrides: Sequence[str] = (),
    output_dir: str = "ablation_results",
    axes: Sequence[str] | None = None,
    strategy: str | None = None,
    tokens: int | None = None,
    gpus: int = 1,
    resume: bool = False,
    datasets_file: str | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Plan (or reload with ``resume``), train and rank a study; 0 when every run finished, else 1.

    Bad input raises ``AblationError``/``ConfigError`` (``ValueError``s) before any run starts.
    """
    study_dir = Path(output_dir)
    if study_dir.exists() and not study_dir.is_dir():
        raise AblationError(f"--output-dir: {study_dir} is a file; give a directory for the study")
    devices = _devices(gpus)  # checked before anything is written
    if resume:
        given = {"--base-config": base_config, "--set": list(overrides) or None, "--axes": axes,
                 "--strategy": strategy, "--tokens": tokens, "--custom-datasets": datasets_file}  # fmt: skip
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise AblationError(f"--resume reloads the plan from {study_dir / MANIFEST}; drop {', '.join(extra)}")
        study = load_study(study_dir)
        # every run's resolved config was saved when the study was planned; the data of the runs still to
        # train may have gone since
        configs = {run.name: load_config(study_dir / run.name / "config.yaml") for run in study.runs}
        configs = {n: c for n, c in configs.items() if not run_finished(study_dir / n)}
    else:
        if (study_dir / MANIFEST).is_file():
            raise AblationError(f"--output-dir: {str(study_dir)!r} already holds a study; add --resume or pick another")
        path = base_config or "configs/config.yaml"
        base = load_config(path, overrides)
        study, configs = plan_study(base, path, study_dir, axes, strategy, tokens, datasets_file)
    # one error before anything is written or trained, not the same failure in every run using the data
    unreachable = data_unreachable(configs)
    if unreachable and not dry_run:
        raise AblationError(unreachable)
    say(f"study {study_dir}: {len(study.runs)} runs ({study.strategy} over {', '.join(study.axes)})")
    if _cpu_only():
        say(f"  note: no CUDA device: runs train on the CPU, {len(devices)} at a time")
    if unreachable:  # dry run: a plan may be made where its data cannot be read; say what would fail
        say(f"  note: training here would stop before the first run: {unreachable}")
    for note in study.notes:
        say(f"  note: {note}")
    for run in study.runs:
        say(
            f"  {run.name}: {run.overrides or 'base config'} ({format_count(run.params_total)} params, {format_count(run.params_active)} active)"
        )
    if dry_run:
        return 0
    if not resume:
        study_dir.mkdir(parents=True, exist_ok=True)
        save_config(base, study_dir / "base_config.yaml")
        for name, config in configs.items():
            save_config(config, study_dir / name / "config.yaml")
        save_study(study, study_dir)
    Runner(study, study_dir, devices, say).run()
    rows, metric = write_summary(study, study_dir)
    say(f"Ranking by {'held-out' if metric == 'val_loss' else 'final train'} loss (lower is better):")
    say(ranking_table(rows, metric))
    say(f"results: {study_dir / 'results.md'}")
    return 0 if all(r.status == "completed" for r in study.runs) else 1
