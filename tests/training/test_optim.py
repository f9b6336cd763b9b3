"""Optimiser parameter groups, the row-sparse table optimiser, gradient clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llm.config.defaults import PEERConfig, TrainConfig
from llm.training.optim import OptimizerList, build_optimizer, clip_grad_norm, param_groups


class FakePEER(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)
        self.u = nn.Parameter(torch.randn(8, 1, 4))
        self.v = nn.Parameter(torch.randn(8, 1, 4))

    def table_parameters(self):
        return [self.u, self.v]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.peer = FakePEER()
        self.out = nn.Linear(4, 10)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_groups_split_decay_no_decay_and_tables():
    model = Net()
    tc = TrainConfig(weight_decay=0.1)
    groups = {
        g["name"]: g for g in param_groups(tc, model, PEERConfig(table_lr_multiplier=5.0, table_weight_decay=0.01))
    }
    assert _names(model, groups["decay"]) == ["embed.weight", "out.weight", "peer.query.weight"]
    assert _names(model, groups["no_decay"]) == ["norm.bias", "norm.weight", "out.bias", "peer.query.bias"]
    assert _names(model, groups["tables"]) == ["peer.u", "peer.v"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert groups["tables"]["weight_decay"] == 0.01 and groups["tables"]["lr_multiplier"] == 5.0


def test_a_bare_peer_layer_gets_the_table_group():
    """The tables of a PEER layer passed on its own (not inside a model) still form the table group."""
    peer = FakePEER()
    groups = {g["name"]: g for g in param_groups(TrainConfig(), peer, PEERConfig(table_lr_multiplier=5.0))}
    assert _names(peer, groups["tables"]) == ["u", "v"] and groups["tables"]["lr_multiplier"] == 5.0


def test_build_optimizer_adamw_covers_every_parameter_once():
    model = Net()
    opt = build_optimizer(TrainConfig(), model, PEERConfig())
    assert isinstance(opt, torch.optim.AdamW)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_sparse_adam_takes_the_tables_and_steps_with_adamw():
    from llm.ops.row_sparse_adam import RowSparseAdamW

    model = Net()
    opt = build_optimizer(TrainConfig(), model, PEERConfig(table_optimizer="sparse_adam"))
    assert isinstance(opt, OptimizerList) and isinstance(opt.optimizers[1], RowSparseAdamW)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "tables"]
    before = model.peer.u.detach().clone()
    model.peer.u.grad = torch.zeros_like(model.peer.u)
    model.peer.u.grad[3] = 1.0  # one touched row
    model.out.weight.grad = torch.ones_like(model.out.weight)
    opt.step()
    changed = (model.peer.u.detach() != before).any(dim=(1, 2))
    assert changed.tolist() == [i == 3 for i in range(8)]
    state = opt.state_dict()
    fresh = build_optimizer(TrainConfig(), Net(), PEERConfig(table_optimizer="sparse_adam"))
    fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="optimisers"):
        fresh.load_state_dict({"0": state["0"]})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_table_moment_dtype_sets_the_sparse_optimisers_moments(dtype):
    model = Net()
    opt = build_optimizer(TrainConfig(), model, PEERConfig(table_optimizer="sparse_adam", table_moment_dtype=dtype))
    model.peer.u.grad = torch.zeros_like(model.peer.u)
    model.peer.u.grad[3] = 1.0
    opt.step()
    assert opt.optimizers[1].state[model.peer.u]["exp_avg"].dtype == getattr(torch, dtype)


def test_clip_grad_norm_dense_and_sparse_agree():
    a = nn.Parameter(torch.zeros(4, 3))
    b = nn.Parameter(torch.zeros(4, 3))
    g = torch.zeros(4, 3)
    g[1] = 3.0
    g[2] = 4.0
    a.grad = g.clone()
    b.grad = g.clone().to_sparse()
    dense_norm = clip_grad_norm([a], 1.0)
    sparse_norm = clip_grad_norm([b], 1.0)
    assert torch.allclose(dense_norm, sparse_norm)
    assert torch.allclose(a.grad, b.grad.to_dense(), atol=1e-6)
    assert torch.allclose(a.grad.norm(), torch.tensor(1.0), atol=1e-5)
    c = nn.Parameter(torch.zeros(2))
    c.grad = torch.tensor([float("nan"), 1.0])
    assert not torch.isfinite(clip_grad_norm([c], 0.0))
