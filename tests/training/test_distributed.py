"""Two gloo processes under torchrun: the run completes, ranks train on disjoint data, rank 0 logs."""

from __future__ import annotations

import json
import subprocess

import pytest
from trainer_helpers import PYTHON, ROOT, script_env, tiny_overrides

from llm.training.checkpoint import Checkpointer, load_model_weights
from llm.training.distributed import DistInfo, unwrap


def _torchrun(run, *extra, resume=()):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "training" / "ddp_probe.py"), *resume, str(ROOT / "configs" / "tiny.yaml"),
           *tiny_overrides(run, "train_config.max_steps=4", "train_config.log_interval=1", "eval_config.sample_tokens=4",
                           *extra)]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "ddp-sparse_adam"])
def test_two_process_gloo_run(tmp_path, strategy):
    run = tmp_path / strategy
    # FSDP also runs the chunked LM-head loss: its recomputation in backward must see gathered head weights.
    chunked = ("model_config.loss_chunk_tokens=16",) if strategy == "fsdp" else ()
    # sparse_adam: the tables are outside DDP's reducer, averaged by the loop (average_table_grads)
    sparse = ("model_config.peer_config.table_optimizer=sparse_adam",) if strategy.endswith("sparse_adam") else ()
    proc = _torchrun(
        run, f"train_config.distributed={strategy.split('-')[0]}", "train_config.checkpoint_interval=2", *chunked, *sparse
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    probes = [json.loads((run / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    assert [p["status"] for p in probes] == ["completed", "completed"]
    if strategy != "fsdp":  # replicated parameters: every rank holds the same model after the updates
        assert probes[0]["weight_sum"] == probes[1]["weight_sum"]
    seqs = [{tuple(s) for s in p["sequences"]} for p in probes]
    assert len(seqs[0]) == len(seqs[1]) == 4 * 2  # 4 steps x batch 2, no repeats within a rank
    assert not seqs[0] & seqs[1]  # disjoint shards
    assert probes[0]["perplexity"] == probes[1]["perplexity"]  # evaluation reduced over both ranks
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]  # rank 0 alone writes, once per step
    assert train_records[-1]["tokens"] == 4 * 2 * 2 * 32  # both ranks' tokens counted
    latest = Checkpointer(run, info=DistInfo(world_size=2)).latest()
    assert latest.name == "step_00000004"
    assert {p.name for p in latest.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    weights = load_model_weights(latest)  # safetensors under DDP, DCP folder under FSDP
    assert "embed.weight" in weights and weights["embed.weight"].shape[1] == 32
    assert ((latest / "model_dcp").is_dir()) == (strategy == "fsdp")
    if strategy == "fsdp":  # sharded state (DCP) resumes exactly: redo steps 3-4 from step 2
        step2 = str(run / "checkpoints" / "step_00000002")
        again = _torchrun(
            run, "train_config.distributed=fsdp", "train_config.checkpoint_interval=2", *chunked,
            resume=("--resume", step2),
        )
        assert again.returncode == 0, again.stderr[-4000:]
        redone = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["loss"]) for r in redone if "loss" in r] == [
            (r["step"], r["loss"]) for r in train_records
        ]


def test_table_gradients_are_averaged_over_ranks(tmp_path):
    """sparse_adam under DDP: the tables are outside DDP's reducer; their row gradients (different rows
    and counts per rank, two tables whose counts share one all-gather) are all-gathered and averaged,
    dense ones all-reduced, the same on every rank."""
    import torch

    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "training" / "sparse_grad_probe.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    want = torch.zeros(8, 2, 3)
    for rank, rows in enumerate(([1, 4], [4, 5, 7])):
        values = torch.arange(len(rows) * 6, dtype=torch.float32).view(-1, 2, 3) + 10 * rank
        want.index_add_(0, torch.tensor(rows), values)
    second = torch.zeros(4, 3)
    second[[0, 3]] = 0.5  # rank 0 only (ones / 2)
    second[2] = 1.5  # rank 0 (ones) and rank 1 (twos), averaged
    for g in got:
        torch.testing.assert_close(g["sparse"], want / 2, rtol=0, atol=0)
        torch.testing.assert_close(g["dense"], torch.full((3,), 1.5), rtol=0, atol=0)
        torch.testing.assert_close(g["second"], second, rtol=0, atol=0)


def test_unwrap_reaches_the_inner_module():
    import torch

    inner = torch.nn.Linear(2, 2)
    outer = torch.nn.Module()
    outer.module = inner
    assert unwrap(outer) is inner and unwrap(inner) is inner


def _usage_counts_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from llm.config.defaults import PEERConfig, TrainConfig
    from llm.models.experts import PEER
    from llm.training.distributed import wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same weights on both ranks, as DDP requires
    cfg = PEERConfig(num_experts=64, product_key_dim=[8, 8], num_experts_per_tok=4, num_heads=2, query_dim=8,
                     log_expert_usage=True)  # fmt: skip
    peer = PEER(16, cfg)
    ddp = wrap_model(peer, peer, TrainConfig(distributed="ddp"), DistInfo(rank=rank, world_size=world_size))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(100 + rank))  # different data per rank
    for _ in range(2):
        ddp(x).sum().backward()
    _, idx = peer.retrieve(x)
    expected = torch.zeros(2, 64, dtype=torch.int64)
    for h in range(2):
        expected[h] += 2 * torch.bincount(idx[..., h, :].reshape(-1), minlength=64)
    torch.save({"counts": peer.usage_counts.clone(), "expected": expected}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _spawn_two_gloo_ranks(worker, tmp_path) -> None:
    """Run ``worker(rank, 2, port, out_dir)`` in two processes (each joins a gloo group on a free port)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)


def test_ddp_keeps_each_ranks_usage_counts(tmp_path):
    """DDP must not overwrite a rank's PEER usage tallies with rank 0's (broadcast_buffers)."""
    import torch

    _spawn_two_gloo_ranks(_usage_counts_worker, tmp_path)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for result in saved:
        assert torch.equal(result["counts"], result["expected"])
    assert not torch.equal(saved[0]["counts"], saved[1]["counts"])  # the ranks really saw different tokens


def _vote_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from llm.training.distributed import DeferredVote

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    vote = DeferredVote()
    answers = [vote.vote(rank == 1 and step >= 3) for step in range(8)]  # only rank 1 is signalled, at step 3
    torch.save(answers, f"{out_dir}/vote{rank}.pt")
    dist.destroy_process_group()


def test_deferred_vote_stops_every_rank_at_the_same_step(tmp_path):
    """A stop flag raised on one rank is seen by all ranks LAG steps later, at the same step."""
    import torch

    from llm.training.distributed import DeferredVote

    _spawn_two_gloo_ranks(_vote_worker, tmp_path)
    answers = [torch.load(tmp_path / f"vote{r}.pt") for r in (0, 1)]
    first = 3 + DeferredVote.LAG
    assert answers[0] == answers[1] == [step >= first for step in range(8)]
    assert DeferredVote().vote(True)  # one process: the flag is its own answer at once
