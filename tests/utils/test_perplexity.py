"""Held-out perplexity: token-weighted, ignores padding, restores the model's mode."""

from __future__ import annotations

import math

import torch
from torch import nn

from llm.utils.eval.perplexity import evaluate_perplexity


class FixedLogits(nn.Module):
    """Logits that give token 0 probability p0 everywhere, the rest uniform over V - 1."""

    def __init__(self, vocab: int, p0: float | None = None) -> None:
        super().__init__()
        self.vocab, self.p0 = vocab, p0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, doc_ids=None):
        B, T = input_ids.shape
        if self.p0 is None:
            return torch.zeros(B, T, self.vocab)
        probs = torch.full((self.vocab,), (1 - self.p0) / (self.vocab - 1))
        probs[0] = self.p0
        return probs.log().expand(B, T, self.vocab)


def _batch(labels):
    labels = torch.tensor(labels)
    return {"input_ids": torch.zeros_like(labels), "labels": labels, "doc_ids": torch.zeros_like(labels)}


def test_uniform_model_has_perplexity_vocab_size():
    out = evaluate_perplexity(FixedLogits(7), [_batch([[1, 2, 3]])] * 3, max_batches=10, device=torch.device("cpu"))
    assert math.isclose(out["perplexity"], 7.0, rel_tol=1e-6) and out["tokens"] == 9


def test_token_weighted_and_padding_ignored():
    model = FixedLogits(5, p0=0.5)
    batches = [_batch([[0, 0, 0, 0]]), _batch([[1, -100, -100, -100]])]  # 4 easy tokens, 1 hard, 3 padding
    out = evaluate_perplexity(model, batches, max_batches=2, device=torch.device("cpu"))
    expected = (4 * -math.log(0.5) + -math.log(0.125)) / 5
    assert out["tokens"] == 5 and math.isclose(out["loss"], expected, rel_tol=1e-6)
    assert math.isclose(out["perplexity"], math.exp(expected), rel_tol=1e-6)


def test_max_batches_and_mode_restored():
    model = FixedLogits(3)
    model.train()
    out = evaluate_perplexity(model, iter([_batch([[1]])] * 10), max_batches=4, device=torch.device("cpu"))
    assert out["tokens"] == 4 and model.training
    empty = evaluate_perplexity(model, [], max_batches=4, device=torch.device("cpu"))
    assert empty["tokens"] == 0 and math.isnan(empty["perplexity"])
