"""Helpers of the script tests: load a script as a module, save a tiny checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from llm.config import Config, load_config
from llm.models.foundation import FoundationModel
from llm.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]
# A tiny PEER model on the embedded data (CPU-sized).
TINY = [
    "model_config.dim=32", "model_config.num_layers=2", "model_config.ffn_hidden_size=64",
    "model_config.peer_config.num_experts=256", "model_config.peer_config.product_key_dim=[16,16]",
    "model_config.peer_config.query_dim=16", "model_config.peer_config.num_heads=2",
    "model_config.mla_config.kv_lora_rank=16", "model_config.mla_config.qk_nope_head_dim=8",
    "model_config.mla_config.qk_rope_head_dim=8", "model_config.mla_config.v_head_dim=8",
    "model_config.mla_config.num_heads=2", "dataset_config.seq_len=32",
]  # fmt: skip


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py imported as a module, so tests call its main(argv)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_checkpoint(run_dir: Path, step: int) -> tuple[Config, FoundationModel, Path]:
    """A freshly initialised (seeded) tiny model saved as checkpoint ``step`` of ``run_dir``."""
    config = load_config(ROOT / "configs/tiny.yaml", TINY)
    torch.manual_seed(0)
    model = FoundationModel(config.model_config)
    saved = Checkpointer(run_dir).save(step, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, {}, config)
    return config, model, saved
