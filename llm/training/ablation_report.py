"""Ablation results: read each run's ``metrics.jsonl``, rank the runs, write ``results.csv`` / ``results.md``.

Split from ``ablation.py`` (planning and running); this module only reads run folders and renders.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm.training.metrics import read_jsonl

if TYPE_CHECKING:
    from llm.training.ablation import Study

BASE = "(base)"  # coordinate of an axis none of whose variants equals the base config


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """Summary of ``metrics.jsonl``: final held-out loss, train loss (mean of the last 5 logs), speed."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if isinstance(r.get("loss"), (int, float))]
    val = [r for r in records if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
    return {
        "val_loss": val[-1].get("val_loss") if val else None,
        "val_perplexity": val[-1].get("val_perplexity") if val else None,
        "val_step": val[-1].get("step") if val else None,
        "train_loss": statistics.fmean(r["loss"] for r in train[-5:]) if train else None,
        "steps": max((r.get("step", 0) for r in records), default=0),
        "tokens": max((r.get("tokens", 0) for r in train), default=0),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
    }


def summary_rows(study: Study, study_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """One row per run, ranked (finished first, by the ranking metric); (rows, metric name).

    The metric is the final held-out loss when a finished run has one (runs without one rank last),
    else the final train loss (mixes without held-out data log none).
    """
    rows = []
    for run in study.runs:
        m = read_metrics(study_dir / run.name)
        # the axes' coordinates last: an axis named like a metric column keeps its variant names
        rows.append({"run": run.name, "status": run.status, **m, "params_total": run.params_total,
                     "params_active": run.params_active, "wall_s": round(run.wall_s, 1), "error": run.error,
                     **run.coords})  # fmt: skip
    done = [r for r in rows if r["status"] == "completed"]
    # Held-out loss when any finished run has one: a run without one (its loss went non-finite at the
    # end, logged null) ranks last rather than switching the whole study to train loss, where its
    # last finite logs, from before it diverged, could win.
    metric = "val_loss" if any(_finite(r["val_loss"]) for r in done) else "train_loss"
    ranked = sorted(done, key=lambda r: (not _finite(r[metric]), r[metric] if _finite(r[metric]) else 0.0))
    for i, row in enumerate(ranked):
        row["rank"] = i + 1
    return ranked + [r for r in rows if r["status"] != "completed"], metric


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_summary(study: Study, study_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """``results.csv`` and ``results.md`` (ranking, best config, per-axis comparison, failures); (rows, metric)."""
    rows, metric = summary_rows(study, study_dir)
    columns = ["rank", "run", "status", *study.axes, "val_loss", "val_perplexity", "train_loss", "steps", "tokens",
               "tokens_per_s", "params_total", "params_active", "wall_s", "error"]  # fmt: skip
    with open(study_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (study_dir / "results.md").write_text(render_markdown(study, rows, metric), encoding="utf-8")
    return rows, metric


# Config keys that set a run's length: an axis varying them keeps its own (--tokens does not apply).
LENGTH_KEYS = frozenset({"train_config.max_tokens", "train_config.max_steps"})
# Config keys that decide which tokens the held-out loss is measured on (data_mix has its own note).
HELD_OUT_KEYS = (
    "train_config.batch_size", "eval_config.eval_batches", "dataset_config.seq_len", "dataset_config.seed",
    "dataset_config.tokenizer", "dataset_config.sources", "dataset_config.datasets_file",
)  # fmt: skip


def _held_out_changes(study: Study) -> dict[str, list[str]]:
    """run name -> the held-out-defining keys its overrides set."""
    return {run.name: keys for run in study.runs if (keys := [k for k in HELD_OUT_KEYS if k in run.overrides])}


def render_markdown(study: Study, rows: list[dict[str, Any]], metric: str) -> str:
    done = [r for r in rows if r.get("rank")]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "failed", "interrupted", "pending")}
    label = "held-out loss" if metric == "val_loss" else "final train loss (no held-out loss logged)"
    out = [f"# Ablation results ({study.strategy}, base {study.base_config})", ""]
    out.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(rows)} runs; ranked by {label}.")
    if study.tokens:
        own_length = [r.name for r in study.runs if LENGTH_KEYS & set(r.overrides)]
        out.append(
            f"Every run trains {format_count(study.tokens)} tokens"
            + (f", except {', '.join(own_length)}, whose axis sets the length." if own_length else ".")
        )
    budgets = {r["run"]: r["tokens"] for r in done}
    if len(set(budgets.values())) > 1:  # e.g. a batch-size axis with a length set in steps, or --tokens 0
        out.append(
            "Note: the ranked runs trained different numbers of tokens ("
            + ", ".join(f"{run} {format_count(n)}" for run, n in budgets.items())
            + "); a longer run's lower loss need not mean a better config."
        )
    if done:
        best = done[0]
        changed = {k: v for r in study.runs if r.name == best["run"] for k, v in r.overrides.items()}
        out += [
            "",
            f"**Best: {best['run']}**, {metric} {_num(best[metric])}; overrides: {changed or 'none (base config)'}",
        ]
    out += ["", "## Ranking", "", ranking_table(rows, metric)]
    out += ["", "## Per-axis comparison", ""]
    if study.strategy == "one_at_a_time":
        out.append("Each axis: its variants with every other axis at the base config.")
    else:
        out.append("Each axis: mean and best over the grid points holding each variant.")
    for axis, variants in study.axes.items():
        out += ["", f"### {axis}", "", "| variant | runs | mean | best | best run |", "|---|---|---|---|---|"]
        home = study.base_variants.get(axis, BASE)
        for variant in dict.fromkeys([home, *variants]):
            group = [r for r in done if r.get(axis) == variant and r[metric] is not None]
            if study.strategy == "one_at_a_time":  # only the runs that vary this axis alone
                group = [
                    r
                    for r in group
                    if all(r.get(a) == study.base_variants.get(a, BASE) for a in study.axes if a != axis)
                ]
            if not group:
                out.append(f"| {variant} | 0 | - | - | - |")
                continue
            best = min(group, key=lambda r: r[metric])
            mean = statistics.fmean(r[metric] for r in group)
            out.append(
                f"| {variant}{' (base)' * (variant == home)} | {len(group)} | {_num(mean)} | {_num(best[metric])} | {best['run']} |"
            )
    if "data_mix" in study.axes:
        out += ["", "Note: each data_mix run's held-out loss is measured on its own mix's validation data, so the"
                " losses of different mixes are not directly comparable; evaluate every checkpoint on one common"
                " set (scripts/run_evaluation.py) before choosing a mix."]  # fmt: skip
    changed = _held_out_changes(study)
    if changed:
        out += ["", "Note: " + "; ".join(f"{run} sets {', '.join(keys)}" for run, keys in changed.items())
                + ". These settings also change the held-out set (its size is batch_size x eval_batches x seq_len"
                " tokens; its documents depend on the mix, the tokenizer and the data seed), so those runs' losses"
                " are measured on other data than the rest; compare them on one common set with"
                " scripts/run_evaluation.py before choosing."]  # fmt: skip
    unfinished = [r for r in rows if r["status"] != "completed"]
    if unfinished:
        out += ["", "## Not finished", ""]
        for r in unfinished:
            out.append(
                f"- **{r['run']}**: {r['status']}" + (f", exit code {_rc(study, r)}" if r["status"] == "failed" else "")
            )
            if r["error"]:
                out += ["", "  ```", *("  " + line for line in r["error"].splitlines()), "  ```"]
    if study.notes:
        out += ["", "## Planning notes", "", *(f"- {n}" for n in study.notes)]
    return "\n".join(out) + "\n"


def ranking_table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = ["| rank | run | val loss | val ppl | train loss | tokens | tokens/s | params (total / active) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        rank = r.get("rank") or r["status"]
        lines.append(f"| {rank} | {r['run']} | {_num(r['val_loss'])} | {_num(r['val_perplexity'], 2)} | "
                     f"{_num(r['train_loss'])} | {format_count(r['tokens'])} | {format_count(r['tokens_per_s'])} | "
                     f"{format_count(r['params_total'])} / {format_count(r['params_active'])} |")  # fmt: skip
    return "\n".join(lines)


def _rc(study: Study, row: dict[str, Any]) -> Any:
    return next(r.returncode for r in study.runs if r.name == row["run"])


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def format_count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
