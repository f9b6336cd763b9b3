"""Held-out perplexity: exp of the token-weighted mean cross-entropy over validation batches.

Token-weighted (sum of losses / number of predicted tokens), not a mean of per-batch means, so a
short padded last batch counts for its tokens only. Labels of -100 (padding) are ignored.
Across ranks the sums are added, so every rank gets the perplexity of the union of their shards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm.models.foundation import FoundationModel
from llm.training import distributed

IGNORE_INDEX = -100


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss and perplexity of ``model`` over at most ``max_batches`` batches.

    Args:
        model: maps input_ids (B, T) [and doc_ids (B, T)] to logits (B, T, V).
        batches: dicts with "input_ids", "labels" (B, T) and optionally "doc_ids".
        max_batches: batches read per rank.
        device: where the model runs.
        autocast_dtype: torch.bfloat16 for a bf16 autocast forward; None = the model's dtype.
    Returns:
        {"loss": nats per token, "perplexity": exp(loss), "tokens": tokens scored (all ranks)}.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # (sum of losses, tokens)
    it = iter(batches)
    try:
        for _ in range(max_batches):
            batch = next(it, None)
            # Ranks must run the same number of forwards (FSDP gathers weights collectively).
            if not distributed.all_true(batch is not None):
                break
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            doc_ids = batch.get("doc_ids")
            ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with ctx:
                loss_sum, tokens = _summed_cross_entropy(model, ids, labels, None if doc_ids is None else doc_ids.to(device))
            total += torch.tensor([loss_sum, tokens], dtype=torch.float64)
    finally:
        model.train(was_training)
    loss_sum, tokens = distributed.all_reduce_sum(total).tolist()
    mean = loss_sum / tokens if tokens > 0 else math.nan
    return {"loss": mean, "perplexity": math.exp(mean) if tokens > 0 else math.nan, "tokens": int(tokens)}


def _summed_cross_entropy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor | None) -> tuple[float, int]:
    """(sum of next-token cross-entropies, tokens scored) of one batch.

    A FoundationModel computes its loss inside forward, ``model_config.loss_chunk_tokens`` positions at a
    time, so the (B, T, V) fp32 logits never exist (as in training; under FSDP the head's weights are
    gathered by that forward); other models return logits."""
    tokens = int((labels != IGNORE_INDEX).sum())
    if isinstance(model, FoundationModel):
        _, parts = model(ids, doc_ids=doc_ids, labels=labels)
        return float(parts["ce"]) * tokens, tokens  # ce is the mean over the scored tokens
    logits = model(ids, doc_ids=doc_ids)  # (B, T, V)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return float(loss), tokens


def evaluate_checkpoint(checkpoint_dir: str | Path, config: Any, batches: int | None = None) -> dict[str, float]:
    """Perplexity of a checkpoint's model on ``config``'s validation data (single process).

    The model and its tokenizer come from the checkpoint's own saved config (so a ``config`` for another
    model size or tokenizer can never allocate the wrong model or feed it foreign token ids); ``config``
    supplies the data and the evaluation settings.
    """
    if batches is not None and batches < 1:
        raise ValueError(f"--batches: got {batches}; must be >= 1 (omit it for eval_config.eval_batches)")
    from llm.data import build_tokenizer, build_val_loader
    from llm.models.hf_export import model_from_checkpoint
    from llm.training.distributed import autocast_dtype, pick_device

    device = pick_device(config.train_config)
    saved, model = model_from_checkpoint(checkpoint_dir)
    check_context(saved, config)
    model.to(device)
    tokenizer = build_tokenizer(saved.dataset_config)
    val = build_val_loader(config.dataset_config, tokenizer, config.train_config.batch_size)
    dtype = autocast_dtype(config.train_config, device)
    result = evaluate_perplexity(model, val, batches or config.eval_config.eval_batches, device, dtype)
    if result["tokens"] == 0:
        raise ValueError(NO_HELD_OUT_DATA)
    return result


def check_context(saved: Any, config: Any) -> None:
    """The evaluation's windows (``config``'s seq_len) fit the checkpoint's model (``saved``'s config):
    RoPE is computed on the fly, so longer windows would run and report a context the model never saw."""
    seq_len, limit = config.dataset_config.seq_len, saved.model_config.max_seq_len
    if seq_len > limit:
        raise ValueError(f"dataset_config.seq_len: {seq_len} exceeds the checkpoint model's max_seq_len={limit}")


# Why an evaluation scored nothing: said by run_evaluation (as its error) and by the trainer.
NO_HELD_OUT_DATA = (
    "dataset_config: no held-out tokens to evaluate on (no source has a validation_split or "
    "holdout_documents, or min_chars/max_chars drop every validation document)"
)
