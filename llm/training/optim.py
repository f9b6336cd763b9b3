"""AdamW with parameter groups: decayed matrices, undecayed norms/biases/vectors, and the PEER tables.

Groups (each carries ``lr_multiplier``, which ``schedule.apply_lr`` multiplies into the scheduled lr):

- ``decay``: parameters with >= 2 dimensions (linear weights, embeddings), ``weight_decay``;
- ``no_decay``: norms, biases and every 1-D parameter, no decay (decaying a gain pulls it to 0,
  which changes the function rather than regularising it);
- ``tables``: PEER expert tables (``PEER.table_parameters()``), with ``table_lr_multiplier`` and
  ``table_weight_decay``. Public PEER code raises the tables' lr 4-10x: each row is updated only by
  the tokens that retrieve it, so it sees far fewer gradient steps than a dense weight.

With ``table_optimizer: sparse_adam`` the tables go to the row-sparse optimiser of
``llm/ops/row_sparse_adam.py`` and the two optimisers are stepped together by ``OptimizerList``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llm.config.defaults import PEERConfig, TrainConfig

log = logging.getLogger(__name__)


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every PEER expert table in ``model`` (itself or any submodule exposing ``table_parameters()``),
    deduplicated."""
    seen: set[int] = set()
    tables = []
    for module in model.modules():
        if hasattr(module, "table_parameters"):
            for p in module.table_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    tables.append(p)
    return tables


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf == "bias" or "norm" in name.lower()


def param_groups(train_config: TrainConfig, model: nn.Module, peer_config: PEERConfig) -> list[dict[str, Any]]:
    """The three groups described in the module docstring; empty groups are dropped."""
    tables = {id(p) for p in table_parameters(model)}
    decay, no_decay, table = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in tables:
            table.append(p)
        elif _is_no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": train_config.weight_decay, "lr_multiplier": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_multiplier": 1.0},
        {
            "name": "tables",
            "params": table,
            "weight_decay": peer_config.table_weight_decay,
            "lr_multiplier": peer_config.table_lr_multiplier,
        },
    ]
    return [g for g in groups if g["params"]]


class OptimizerList:
    """Several optimisers stepped as one (dense AdamW + the row-sparse table optimiser).

    Exposes the subset of ``torch.optim.Optimizer`` the trainer uses: ``param_groups`` (all of them,
    so the schedule reaches every group), ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): opt.state_dict() for i, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state) != [str(i) for i in range(len(self.optimizers))]:
            raise ValueError(f"optimizer state holds {len(state)} optimisers, this run has {len(self.optimizers)}")
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(state[str(i)])


def _sparse_table_optimizer(
    groups: list[dict[str, Any]], train_config: TrainConfig, peer_config: PEERConfig
) -> torch.optim.Optimizer:
    try:
        from llm.ops.row_sparse_adam import RowSparseAdamW
    except ImportError as exc:  # the kernels issue provides it; say so rather than silently using AdamW
        raise ValueError(
            "model_config.peer_config.table_optimizer: 'sparse_adam' needs llm/ops/row_sparse_adam.py "
            f"(RowSparseAdamW), which could not be imported ({exc}); use 'adamw'"
        ) from None
    return RowSparseAdamW(
        groups, lr=train_config.lr, betas=(train_config.beta1, train_config.beta2), eps=train_config.eps,
        state_dtype=getattr(torch, peer_config.table_moment_dtype),
    )  # fmt: skip


def build_optimizer(
    train_config: TrainConfig, model: nn.Module, peer_config: PEERConfig | None = None
) -> torch.optim.Optimizer | OptimizerList:
    """AdamW over ``param_groups`` (fused when every parameter is on CUDA), plus the sparse table optimiser.

    ``peer_config`` defaults to ``model.config.peer_config`` when the model carries its config.
    """
    if peer_config is None:
        model_config = getattr(model, "config", None)
        peer_config = getattr(model_config, "peer_config", None) or PEERConfig()
    groups = param_groups(train_config, model, peer_config)
    sparse_groups = []
    if peer_config.table_optimizer == "sparse_adam":
        sparse_groups = [g for g in groups if g["name"] == "tables"]
        groups = [g for g in groups if g["name"] != "tables"]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    # fused=True is CUDA-only here: on CPU the default (foreach) path is the one whose bitwise
    # reproducibility the resume tests rely on.
    adamw = torch.optim.AdamW(
        groups,
        lr=train_config.lr,
        betas=(train_config.beta1, train_config.beta2),
        eps=train_config.eps,
        fused=True if on_cuda and groups else None,
    )
    if not sparse_groups:
        return adamw
    log.info("expert tables use the row-sparse Adam optimiser")
    return OptimizerList([adamw, _sparse_table_optimizer(sparse_groups, train_config, peer_config)])


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (0 = measure only); returns the norm before clipping.

    Sparse table gradients (the row-sparse path) are measured with their stored rows only, since
    ``torch.nn.utils.clip_grad_norm_`` rejects sparse tensors. A DTensor norm (FSDP) is made whole.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if any(g.is_sparse for g in grads):
        from llm.ops.row_sparse_adam import sparse_grad_sq_norm

        norm = torch.stack([sparse_grad_sq_norm(g).to(grads[0].device) for g in grads]).sum().sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return norm
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
