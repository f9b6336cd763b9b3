"""``scripts/analyze_model.py``: parameter, FLOP and cache report of a config, a PNG, expert utilisation.

Counts come from ``llm/utils/eval/size.py`` (the config alone, without importing torch), so the
1M-expert reference config is analysed in about a second on CPU; ``verify`` cross-checks them
against the model built on the meta device, which allocates nothing.

Expert utilisation (with a checkpoint) is measured, not read back: the trained model runs over
``--batches`` validation batches (``llm.data.build_val_loader``) in eval mode, and a forward
pre-hook on each PEER layer records ``PEER.retrieve`` of its input. Measuring on held-out data
works for any checkpoint (the training-time counters are reset at every report, so a checkpoint
holds at most a partial window of them) and in eval mode (the layer's own counters count only in
training mode).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llm.config.defaults import Config, ModelConfig, peer_layer_indices
from llm.utils.eval.size import (
    COMPONENTS,
    ParameterReport,
    count_parameters,
    flops_per_token,
    kv_cache_bytes_per_token,
)


def human(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def meta_parameter_count(model_config: ModelConfig) -> int:
    """``sum(p.numel())`` of ``FoundationModel(model_config)`` built on the meta device (no memory)."""
    import torch

    from llm.models.foundation import FoundationModel

    with torch.device("meta"):
        model = FoundationModel(model_config)
    return sum(p.numel() for p in model.parameters())


def format_report(model_config: ModelConfig, seq_len: int, report: ParameterReport | None = None) -> str:
    """The plain-text tables printed by analyze_model.py."""
    cfg = model_config
    r = report or count_parameters(cfg)
    peers = peer_layer_indices(cfg)
    lines = [
        f"model: {cfg.num_layers} blocks, dim {cfg.dim}, vocab {cfg.vocab_size}, "
        f"PEER blocks {peers or 'none'}, tied embeddings: {cfg.tie_embeddings}",
    ]
    if peers:
        p = cfg.peer_config
        lines.append(
            f"PEER: {p.num_experts:,} experts ({' x '.join(map(str, p.product_key_dim))}), "
            f"{p.num_heads} heads x {p.num_experts_per_tok} experts per token, hidden size {p.expert_hidden_size}"
        )
    lines += ["", f"{'component':<20}{'total':>16}{'active/token':>16}{'share of total':>16}"]
    for name in COMPONENTS:
        c = r.by_component[name]
        if c.total:
            lines.append(f"{name:<20}{c.total:>16,}{c.active:>16,}{c.total / r.total:>15.1%}")
    lines += [
        f"{'total':<20}{r.total:>16,}{r.active:>16,}",
        "",
        f"total parameters:            {human(r.total)} ({human(r.total_non_embedding)} without the input embedding)",
        f"active parameters per token: {human(r.active)} with the input embedding table counted in full, "
        f"{human(r.active_non_embedding)} without it",
        f"total / active:              {r.efficiency_ratio:.1f}x",
    ]
    f = flops_per_token(cfg, seq_len)
    lines += [
        f"FLOPs per token at seq_len {seq_len}: forward {human(f['forward'])} "
        f"(matmul {human(f['matmul'])} + attention {human(f['attention'])}), training {human(f['training'])}",
    ]
    kv = kv_cache_bytes_per_token(cfg)
    lines += [
        f"KV cache per token (bf16, all {cfg.num_layers} blocks): MLA {kv['mla']:,} B; "
        f"MHA {kv['mha']:,} B ({kv['mha'] / kv['mla']:.1f}x MLA); "
        f"GQA with {kv['gqa_kv_heads']} KV heads {kv['gqa']:,} B ({kv['gqa'] / kv['mla']:.1f}x MLA)",
        "",
        f"{'block':<8}{'ffn':<8}{'total':>16}{'active/token':>16}",
    ]
    for layer in r.by_layer:
        lines.append(f"{layer.index:<8}{layer.ffn:<8}{layer.total:>16,}{layer.active:>16,}")
    return "\n".join(lines)


def plot_report(report: ParameterReport, path: str | Path) -> Path:
    """PNG: total vs active parameters per component (left) and per block (right), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in COMPONENTS if report.by_component[n].total]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, labels, totals, actives, title in (
        (left, names, [report.by_component[n].total for n in names], [report.by_component[n].active for n in names],
         "by component (all blocks)"),
        (right, [f"{b.index}\n{b.ffn}" for b in report.by_layer], [b.total for b in report.by_layer],
         [b.active for b in report.by_layer], "by block"),
    ):
        x = np.arange(len(labels))
        ax.bar(x - 0.2, totals, 0.4, label="total")
        ax.bar(x + 0.2, actives, 0.4, label="active per token")
        ax.set_xticks(x, labels, rotation=60 if ax is left else 0, ha="right" if ax is left else "center", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("parameters")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"total {human(report.total)}, active {human(report.active)} per token, ratio {report.efficiency_ratio:.1f}x"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an explicit format: without one, matplotlib appends ".png" to a suffix-less name we then misreport
    fig.savefig(path, dpi=100, format=path.suffix[1:] or "png")
    plt.close(fig)
    return path


def expert_utilisation(config: Config, checkpoint: str | Path, num_batches: int = 8, batch_size: int = 4) -> str:
    """Per PEER block: fraction of experts used, KL from uniform, hottest experts, on validation data.

    The model, its config and its tokenizer come from the checkpoint; the validation data from ``config``.
    Padding positions (label -100) are not counted.
    """
    import torch

    from llm.data import build_tokenizer, build_val_loader
    from llm.data.packing import IGNORE_INDEX
    from llm.models.hf_export import model_from_checkpoint
    from llm.utils.eval.perplexity import check_context
    from llm.utils.experts.metrics import hottest, kl_from_uniform, usage_fraction

    saved, model = model_from_checkpoint(checkpoint)
    check_context(saved, config)
    model.eval()
    peers = model.peer_modules()
    if not peers:
        return "expert utilisation: the model has no PEER blocks"
    counts = {i: torch.zeros(peer.num_experts, dtype=torch.int64) for i, peer in peers}  # heads summed

    real = {}  # the current batch's (B, T) mask of positions that are not padding

    def recorder(index: int):
        def record(module, args):
            _, idx = module.retrieve(args[0])  # (B, T, H, K) flat expert ids
            counts[index] += torch.bincount(idx[real["mask"]].reshape(-1), minlength=module.num_experts)

        return record

    handles = [peer.register_forward_pre_hook(recorder(i)) for i, peer in peers]
    tokenizer = build_tokenizer(saved.dataset_config)
    tokens = batches = 0
    try:
        with torch.no_grad():
            for batch in build_val_loader(config.dataset_config, tokenizer, batch_size):
                if batches == num_batches:
                    break
                real["mask"] = batch["labels"] != IGNORE_INDEX
                model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
                tokens += int(real["mask"].sum())
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        from llm.utils.eval.perplexity import NO_HELD_OUT_DATA

        return f"expert utilisation: not measured: {NO_HELD_OUT_DATA}"
    lines = [
        f"expert utilisation over {tokens:,} validation tokens ({batches} batches of {batch_size}), all heads:",
        f"{'block':<8}{'experts used':>14}{'KL(usage || uniform)':>24}   hottest experts (id: share of selections)",
    ]
    for index, c in counts.items():
        ids, shares = hottest(c, 5)
        hot = ", ".join(f"{i}: {s:.2%}" for i, s in zip(ids, shares, strict=True))
        lines.append(f"{index:<8}{usage_fraction(c):>14.1%}{kl_from_uniform(c):>24.3f}   {hot}")
    return "\n".join(lines)


def _checkpoint_model_config(config: Config, checkpoint: str | Path) -> tuple[Config, str]:
    """``config`` with the checkpoint's model_config where the two differ, and a line saying so."""
    from llm.config import config_diff, load_config
    from llm.models.hf_export import find_checkpoint

    saved_file = find_checkpoint(checkpoint) / "config.yaml"
    saved = load_config(saved_file)
    differing = [k for k in config_diff(saved, config) if k.startswith("model_config.")]
    if not differing:
        return config, ""
    theirs, ours = count_parameters(saved.model_config), count_parameters(config.model_config)
    config = dataclasses.replace(config, model_config=saved.model_config)
    if (theirs.total, theirs.active) == (ours.total, ours.active):  # e.g. only the kernel choice differs
        return config, ""
    shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
    note = f"counts are for the checkpoint's model ({saved_file}), which differs from --config in {shown}\n\n"
    return config, note


def analyze_model(
    config: Config,
    output: str | Path | None = None,
    checkpoint: str | Path | None = None,
    batches: int = 8,
    verify: bool = False,
) -> str:
    """The whole analysis as text; writes the PNG to ``output`` when given.

    ``verify`` also builds the model on the meta device and checks the total against it (this
    imports torch and the model, a few seconds; the counts alone need neither).
    """
    note = ""
    if checkpoint is not None:  # the counts describe the model whose utilisation is measured
        config, note = _checkpoint_model_config(config, checkpoint)
    model_config = config.model_config
    report = count_parameters(model_config)
    text = note + format_report(model_config, config.dataset_config.seq_len, report)
    if verify:
        built = meta_parameter_count(model_config)
        if built != report.total:
            raise AssertionError(f"size.py counts {report.total:,} parameters but the model has {built:,}")
        text += f"\n\nparameter count verified against the model built on the meta device: {built:,}"
    if output is not None:
        text += f"\nwrote {plot_report(report, output)}"
    if checkpoint is not None:
        text += "\n\n" + expert_utilisation(config, checkpoint, num_batches=batches)
    return text
