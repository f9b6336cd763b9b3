"""Routing on the GPU: top-k and merge kernels vs torch, launch sweep, and a profile of the PEER layer.

    python benchmarks/routing_topk.py [--profile-out FILE]

Rows are (token, head) pairs at the paper's size (T=4096, H=8): 32768 rows of 1024 sub-key scores, k=16,
and the 32768 x (16 x 16) merge. Times are CUDA-event medians (triton.testing.do_bench). The profile is
a torch.profiler table (CUDA time per op) of one PEER layer forward+backward at the paper's size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.ops.triton_peer_routing import merge_topk_reference, merge_topk_triton  # noqa: E402
from llm.ops.triton_topk import topk_positions_reference, topk_triton  # noqa: E402


def bench(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def topk_sweep(R: int, C: int, k: int) -> None:
    scores = torch.randn(R, C, device="cuda")
    want = topk_positions_reference(scores, k)
    for tile, warps in [(1024, 1), (1024, 2), (2048, 1), (2048, 2), (2048, 4), (4096, 4), (8192, 8)]:
        if tile < C:
            continue
        got = topk_triton(scores, k, tile_elements=tile, num_warps=warps)[1]
        ms = bench(lambda tile=tile, warps=warps: topk_triton(scores, k, tile_elements=tile, num_warps=warps))
        print(f"topk R={R} C={C} k={k}: tile {tile:5d} warps {warps}: {ms:.3f} ms exact={torch.equal(got, want)}")
    ms_sort = bench(lambda: topk_positions_reference(scores, k))
    ms_topk = bench(lambda: scores.topk(k, dim=-1))
    print(f"topk R={R} C={C} k={k}: stable sort {ms_sort:.3f} ms, torch.topk {ms_topk:.3f} ms")


def merge_bench() -> None:
    R, k, n = 32768, 16, 1024
    a, b = torch.randn(R, k, device="cuda"), torch.randn(R, k, device="cuda")
    a_ids = (torch.arange(k, device="cuda") * 7).expand(R, k).contiguous()  # distinct ids, any order
    b_pos = (torch.arange(k, device="cuda") * 3).expand(R, k).contiguous()
    got, want = merge_topk_triton(a, a_ids, b, b_pos, n, k), merge_topk_reference(a, a_ids, b, b_pos, n, k)
    exact = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ms_k = bench(lambda: merge_topk_triton(a, a_ids, b, b_pos, n, k))
    ms_r = bench(lambda: merge_topk_reference(a, a_ids, b, b_pos, n, k))
    print(f"merge R={R} 16x16 -> {k}: kernel {ms_k:.3f} ms, torch reference {ms_r:.3f} ms, exact={exact}")


def profile_layer(out: str) -> None:
    from llm.config.defaults import PEERConfig
    from llm.models.experts import PEER

    D, H, K, T, side = 1024, 8, 16, 4096, 1024
    cfg = PEERConfig(num_experts=side * side, product_key_dim=[side, side], num_experts_per_tok=K, num_heads=H,
                     query_dim=128, kernel="triton", table_optimizer="sparse_adam")  # fmt: skip
    with torch.device("cuda"):
        layer = PEER(D, cfg).to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [x, *layer.parameters()]

    def step():
        return torch.autograd.grad(layer(x), params, torch.ones(T, D, device="cuda", dtype=torch.bfloat16))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    Path(out).write_text(table)
    print("\n".join(table.splitlines()[:22]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile-out", default="", help="write a profiler table of the layer fwd+bwd here")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    topk_sweep(32768, 1024, 16)
    topk_sweep(32768, 256, 16)
    merge_bench()
    if args.profile_out:
        profile_layer(args.profile_out)


if __name__ == "__main__":
    main()
