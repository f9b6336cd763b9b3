"""Run by torchrun in test_distributed.py: average_table_grads over two gloo ranks, results to a file.

torchrun --standalone --nproc-per-node 2 tests/training/sparse_grad_probe.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llm.training.distributed import average_table_grads

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(sys.argv[1])
# rank 0 touches rows 1 and 4, rank 1 rows 4, 5 and 7 (counts differ: the padding path); plus a dense grad
rows = [torch.tensor([1, 4]), torch.tensor([4, 5, 7])][rank]
values = torch.arange(rows.numel() * 6, dtype=torch.float32).view(-1, 2, 3) + 10 * rank
sparse = torch.nn.Parameter(torch.zeros(8, 2, 3))
sparse.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (8, 2, 3))
# a second sparse table, the counts the other way round (rank 0 three rows, rank 1 one): one all-gather
# carries both tables' counts
rows2 = [torch.tensor([0, 2, 3]), torch.tensor([2])][rank]
second = torch.nn.Parameter(torch.zeros(4, 3))
second.grad = torch.sparse_coo_tensor(rows2.unsqueeze(0), torch.ones(rows2.numel(), 3) * (rank + 1), (4, 3))
dense = torch.nn.Parameter(torch.zeros(3))
dense.grad = torch.full((3,), float(rank + 1))
average_table_grads([sparse, dense, second])
torch.save(
    {"sparse": sparse.grad.to_dense(), "dense": dense.grad, "second": second.grad.to_dense()},
    out / f"rank{os.environ['RANK']}.pt",
)
dist.destroy_process_group()
