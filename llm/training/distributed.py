"""torchrun environment -> process group, model wrapping (DDP or FSDP2), and small collectives.

Launched by ``torchrun``, every process finds ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its
environment; without them the run is a single process and every collective here is a no-op, so the
trainer calls them unconditionally. Backend: NCCL on CUDA, gloo on CPU (CI runs 2 gloo processes).
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llm.config.defaults import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def autocast_dtype(train_config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for ``precision: bf16``, or ``auto`` on CUDA; None = run in the parameters' dtype.

    Training, evaluation and sampling all use this, so a checkpoint is evaluated as it was trained.
    """
    if train_config.precision == "bf16" or (train_config.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def pick_device(train_config: TrainConfig, local_rank: int = 0) -> torch.device:
    if train_config.device == "cuda" or (train_config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train_config.device: 'cuda' but no CUDA device is available; use auto or cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(train_config: TrainConfig) -> DistInfo:
    """Read the torchrun environment, pick the device and (when WORLD_SIZE > 1) join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(train_config, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A generous timeout: rank 0 may spend minutes writing a checkpoint while others wait.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_true(flag: bool) -> bool:
    """True on every rank only if ``flag`` is true on every rank (agreement on success/failure)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


class DeferredVote:
    """Ranks agree on a per-step flag (any rank stops -> all stop) without a per-step host sync.

    Step s reduces this rank's flag and the answer is read at step s + LAG, so every rank sees the same
    answer at the same step. With NCCL the all-reduce is queued on the stream and the reduced flag is
    copied to pinned host memory behind an event: reading it waits at most until the GPU has finished
    step s, long done by then. With gloo (CPU) the all-reduce completes at once (microseconds there; no
    asynchronous gloo work is left pending beside the training collectives). Without a process group
    the flag is its own answer, at once. Votes still queued when the loop ends need no waiting for.
    """

    LAG = 2

    def __init__(self) -> None:
        self._pending: collections.deque = collections.deque()

    def vote(self, flag: bool) -> bool:
        """Record this step's flag; True when the vote of LAG steps ago found a flag on any rank."""
        if not dist.is_initialized():
            return flag
        device = _collective_device()
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)
        work.wait()  # NCCL: orders the copy after the reduction on the stream (no host wait); gloo: done
        if device.type == "cuda":
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        else:
            self._pending.append((t, None))
        if len(self._pending) <= self.LAG:
            return False
        value, event = self._pending.popleft()
        if event is not None:
            event.synchronize()
        return bool(value.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (returns a new tensor on the input's device)."""
    if not dist.is_initialized():
        return values.clone()
    t = values.detach().to(_collective_device()).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(values.device)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_model(module: nn.Module, inner: nn.Module, train_config: TrainConfig, info: DistInfo) -> nn.Module:
    """Wrap the training module for data parallelism.

    ``module`` is what the loop calls (a loss wrapper around ``inner``, the model). DDP wraps ``module``;
    FSDP2 shards each child of ``inner``'s ModuleLists (the blocks), then ``inner`` itself, so the
    checkpointer sees the model's own parameter names. Single-process runs are returned unchanged.
    """
    if not info.enabled:
        return module
    if train_config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for child in inner.modules():
            if isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block)
        fully_shard(inner)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    # DDP broadcasts rank 0's buffers before every forward. PEER's usage counts are per-rank tallies that
    # the tracker sums with an all-reduce: broadcasting them would replace each rank's counts by rank 0's.
    local_tallies = [name for name, _ in module.named_buffers() if name.endswith("usage_counts")]
    # Row-sparse table gradients: DDP's reducer takes sparse gradients of nn.Embedding only, so those
    # tables are left out of it and averaged by ``average_table_grads`` before the optimiser step.
    tables = {id(p) for p in sparse_table_parameters(inner)}
    sparse_tables = [name for name, p in module.named_parameters() if id(p) in tables]
    DDP._set_params_and_buffers_to_ignore_for_model(module, local_tallies + sparse_tables)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids)


def sparse_table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The PEER expert tables that the row-sparse optimiser updates (``table_optimizer: sparse_adam``)."""
    config = getattr(model, "config", None)
    peer = getattr(config, "peer_config", None)
    if peer is None or peer.table_optimizer != "sparse_adam" or not hasattr(model, "peer_modules"):
        return []
    return [p for _, layer in model.peer_modules() for p in layer.table_parameters()]


def average_table_grads(params: list[nn.Parameter]) -> None:
    """Average the tables' gradients over the ranks, as DDP does for every other parameter.

    Dense gradients are all-reduced. Sparse (row) gradients are all-gathered: each rank's rows and values,
    padded to the largest count, concatenated in rank order and divided by the world size; rows two ranks
    touched appear twice, which the optimiser's coalesce sums. The row counts of every sparse table go in
    one all-gather, read on the host once per step (not once per table). Every rank must hold a gradient
    of the same layout for each parameter (PEER tables always do).
    """
    if not dist.is_initialized() or not params:
        return
    world = dist.get_world_size()
    sparse = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            sparse.append((p, p.grad.coalesce()))
        else:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    if not sparse:
        return
    nnz = torch.tensor([grad._nnz() for _, grad in sparse], device=sparse[0][1].device)
    gathered = [torch.zeros_like(nnz) for _ in range(world)]
    dist.all_gather(gathered, nnz)
    counts_by_rank = torch.stack(gathered).tolist()  # (world, tables): the step's one host wait
    for table, (p, grad) in enumerate(sparse):
        counts = [per_rank[table] for per_rank in counts_by_rank]
        rows, values = grad._indices(), grad._values()  # (1, R), (R, ...)
        pad = max(counts) - rows.shape[1]
        rows = torch.cat([rows, rows.new_zeros(1, pad)], dim=1)
        values = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        all_values = [torch.empty_like(values) for _ in range(world)]
        dist.all_gather(all_rows, rows)
        dist.all_gather(all_values, values)
        p.grad = torch.sparse_coo_tensor(
            torch.cat([r[:, :n] for r, n in zip(all_rows, counts, strict=True)], dim=1),
            torch.cat([v[:n] for v, n in zip(all_values, counts, strict=True)]) / world,
            grad.shape,
        )


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
