"""PEER under torch.compile: usage counts stay exact with activation checkpointing (no double count)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from llm.config.defaults import PEERConfig
from llm.models.experts import PEER


def test_compiled_checkpointed_usage_counts_equal_one_forward():
    torch.manual_seed(0)
    cfg = PEERConfig(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2, query_dim=8,
                     log_expert_usage=True)  # fmt: skip
    peer = PEER(16, cfg)
    x = torch.randn(3, 5, 16)
    step = torch.compile(lambda x: checkpoint(peer, x, use_reentrant=False))
    step(x).sum().backward()
    _, idx = peer.retrieve(x)
    expected = torch.stack([torch.bincount(idx[..., h, :].reshape(-1), minlength=64) for h in range(2)])
    assert torch.equal(peer.usage_counts, expected)
