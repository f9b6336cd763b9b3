"""Helpers shared by the trainer tests: a tiny config, subprocess environment, a toy model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]

# configs/tiny.yaml shrunk further: 2 blocks of width 32, 16x16 experts, 32-token sequences.
TINY_OVERRIDES = [
    "model_config.dim=32",
    "model_config.num_layers=2",
    "model_config.ffn_hidden_size=64",
    "model_config.max_seq_len=64",
    "model_config.peer_config.num_experts=256",
    "model_config.peer_config.product_key_dim=[16,16]",
    "model_config.peer_config.num_heads=2",
    "model_config.peer_config.num_experts_per_tok=4",
    "model_config.peer_config.query_dim=16",
    "model_config.mla_config.num_heads=2",
    "model_config.mla_config.kv_lora_rank=16",
    "model_config.mla_config.qk_nope_head_dim=8",
    "model_config.mla_config.qk_rope_head_dim=8",
    "model_config.mla_config.v_head_dim=8",
    "dataset_config.seq_len=32",
    "train_config.batch_size=2",
    "train_config.warmup_steps=2",
    "train_config.lr=3e-3",
    "eval_config.eval_batches=2",
    "eval_config.sample_tokens=8",
]


def tiny_overrides(output_dir: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"train_config.output_dir={output_dir}", *extra]


def script_env() -> dict[str, str]:
    """Environment for subprocesses: the repo importable, one thread (deterministic, fair to the 2 cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["WANDB_MODE"] = "disabled"
    return env


PYTHON = sys.executable


class Toy(nn.Module):
    """Embedding -> linear -> tied head: enough structure for tied-weight and optimiser-state checks."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.lin(self.embed(x)))


def trained_toy(seed: int = 0) -> tuple[Toy, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.arange(6)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save_toy(cp, step: int, model, opt, config=None):
    from llm.config import Config

    return cp.save(step, model, opt, {"tokens": step * 10}, {"data": {"pos": step}}, config or Config())
