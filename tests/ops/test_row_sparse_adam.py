"""llm/ops/row_sparse_adam.py: the fused row update against its torch reference and against AdamW."""

import copy
import os

import pytest
import torch

from llm.ops.row_sparse_adam import (
    RowSparseAdamW,
    row_adamw_reference_,
    row_adamw_triton_,
    sparse_grad_sq_norm,
    touched_rows,
)
from llm.ops.triton_peer_kernels import peer_experts_triton

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def sparse_rows(rows, values, shape):
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, check_invariants=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_row_update_matches_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    N, W = 12, 1100  # W not a multiple of the block: a masked tail program per row
    p = torch.randn(N, W, generator=gen).to(dtype)
    m, v = torch.randn(N, W, generator=gen), torch.rand(N, W, generator=gen)
    rows = torch.tensor([0, 3, 4, 11])
    g = torch.randn(4, W, generator=gen).to(dtype)
    p, m, v, rows, g = (t.to(DEVICE) for t in (p, m, v, rows, g))
    want = [t.clone() for t in (p, m, v)]
    row_adamw_reference_(want[0], rows, g, want[1], want[2], step=3, **HYPER)
    got = [t.clone() for t in (p, m, v)]
    row_adamw_triton_(got[0], rows, g, got[1], got[2], step=3, **HYPER)
    # bf16 parameters: the two fp32 computations may round to neighbouring bf16 values (one ulp)
    rtol = 1e-5 if dtype == torch.float32 else 8e-3
    for name, a, b in zip(["p", "exp_avg", "exp_avg_sq"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=name)
    untouched = torch.tensor([r for r in range(N) if r not in rows.tolist()])
    for a, before in zip(got, (p, m, v), strict=True):
        assert torch.equal(a[untouched.to(DEVICE)], before[untouched.to(DEVICE)])


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
def test_equals_adamw_when_every_row_is_touched(use_triton):
    gen = torch.Generator().manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(6, 2, 5, generator=gen).to(DEVICE if use_triton else "cpu"))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = RowSparseAdamW([ours], lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1, use_triton=use_triton)
    ref_opt = torch.optim.AdamW([ref], lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(6, 2, 5, generator=gen).to(ours.device)
        ours.grad = sparse_rows(torch.arange(6, device=ours.device), grad, (6, 2, 5))
        ref.grad = grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach().cpu(), ref.detach().cpu(), rtol=1e-5, atol=1e-6)


def test_untouched_rows_keep_parameters_and_moments():
    gen = torch.Generator().manual_seed(2)
    p = torch.nn.Parameter(torch.randn(8, 1, 4, generator=gen))
    opt = RowSparseAdamW([p], lr=1e-1, weight_decay=0.5)
    p.grad = sparse_rows(torch.tensor([1, 5]), torch.randn(2, 1, 4, generator=gen), (8, 1, 4))
    opt.step()
    state = {k: t.clone() for k, t in opt.state[p].items() if torch.is_tensor(t)}
    before = p.detach().clone()
    p.grad = sparse_rows(torch.tensor([2]), torch.randn(1, 1, 4, generator=gen), (8, 1, 4))
    opt.step()
    keep = [0, 1, 3, 4, 5, 6, 7]
    assert torch.equal(p.detach()[keep], before[keep])  # no decay, no momentum drift on rows 1 and 5
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[p][name][keep], state[name][keep])
        assert not torch.equal(opt.state[p][name][2], state[name][2])
    assert opt.state[p]["step"] == 2


def test_kernel_sparse_grads_accumulated_twice_equal_the_dense_path():
    gen = torch.Generator().manual_seed(3)
    T, H, K, N, D = 4, 2, 2, 9, 12
    x = torch.randn(T, D, generator=gen)
    scores = torch.softmax(torch.randn(T, H, K, generator=gen), -1)
    u0, v0 = torch.randn(N, 1, D, generator=gen), torch.randn(N, 1, D, generator=gen)
    batches = [torch.randint(0, N, (T, H, K), generator=gen) for _ in range(2)]
    x, scores, u0, v0, *batches = (t.to(DEVICE) for t in (x, scores, u0, v0, *batches))
    results = []
    for sparse in (True, False):
        u, v = torch.nn.Parameter(u0.clone()), torch.nn.Parameter(v0.clone())
        opt = RowSparseAdamW([u, v], lr=1e-2)
        for idx in batches:  # gradient accumulation: sparse + sparse leaves duplicate rows
            peer_experts_triton(x, idx, scores, u, v, "gelu", sparse_grad=sparse).sum().backward()
        assert u.grad.is_sparse == sparse
        if sparse:
            assert torch.equal(touched_rows(u.grad)[0], torch.unique(torch.cat(batches)))
            dense_norm = sparse_grad_sq_norm(u.grad.to_dense())
            torch.testing.assert_close(sparse_grad_sq_norm(u.grad), dense_norm)
        opt.step()
        results.append((u.detach(), v.detach()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "state_dtype, param_dtype",
    [(None, torch.float32), (torch.bfloat16, torch.float32), (None, torch.bfloat16)],
    ids=["default", "bf16-moments", "bf16-params-fp32-moments"],
)
def test_state_dict_round_trip_continues_identically(state_dtype, param_dtype):
    """torch casts loaded moments to the parameter's dtype; moments must come back in the dtype the
    optimiser keeps them in (bf16 moments stay bf16; bf16 parameters keep fp32 moments)."""
    gen = torch.Generator().manual_seed(4)
    grads = [
        sparse_rows(torch.tensor([0, 2]), torch.randn(2, 3, generator=gen).to(param_dtype), (4, 3)) for _ in range(3)
    ]
    p1 = torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(param_dtype))
    p2 = torch.nn.Parameter(p1.detach().clone())
    opt1 = RowSparseAdamW([p1], lr=1e-2, state_dtype=state_dtype)
    p1.grad = grads[0]
    opt1.step()
    opt2 = RowSparseAdamW([p2], lr=1e-2, state_dtype=state_dtype)
    p2.data.copy_(p1.detach())
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))  # as a checkpoint would
    assert opt2.state[p2]["exp_avg"].dtype == opt1.state[p1]["exp_avg"].dtype == (state_dtype or torch.float32)
    for g in grads[1:]:
        p1.grad, p2.grad = g, g.clone()
        opt1.step()
        opt2.step()
    assert torch.equal(p1.detach(), p2.detach())


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RowSparseAdamW([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_a_gradient_sparse_in_every_dimension_is_refused():
    """Only rows are sparse in the gradients the optimiser takes; a fully sparse COO tensor (to_sparse())
    would otherwise reach the update with one value per 'row'."""
    from llm.ops.row_sparse_adam import touched_rows

    with pytest.raises(ValueError, match="sparse_dim 1"):
        touched_rows(torch.eye(4).to_sparse())
    rows, values = touched_rows(torch.eye(4).to_sparse(sparse_dim=1))
    assert rows.tolist() == [0, 1, 2, 3] and values.shape == (4, 4)
