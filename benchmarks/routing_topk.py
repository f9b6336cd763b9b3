"""Routing on the GPU: top-k and merge kernels vs torch, launch sweep, and a profile of the PEER layer.

    python benchmarks/routing_topk.py [--profile-out FILE] [--no-sweep] [--fused CONFIGS]

Rows are (token, head) pairs at the paper's size (T=4096, H=8): 32768 rows of 1024 sub-key scores, k=16,
and the 32768 x (16 x 16) merge. Times are CUDA-event medians (triton.testing.do_bench). The profile is
a torch.profiler table (CUDA time per op) of one PEER layer forward+backward at the paper's size.
Also: the routing backward against a float64 reference, and a host-sync check of the layer's fwd+bwd.
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


def fused_sweep(configs) -> None:
    """Paper size (T=4096, H=8, 2 x 1024 sub-keys of 64, k=16): the unfused routing forward (fp32 score
    GEMMs, per-part top-k, merge) against the fused kernel's launches (block_t, block_n, warps).

    Agreement with the unfused path on Gaussian data (ids equal per slot; values to rounding), and exact
    equality on small-integer data (scores exact in every precision).
    """
    from llm.models import product_keys
    from llm.ops.triton_retrieval import fused_retrieval

    T, H, n, q, K = 4096, 8, 1024, 64, 16
    q_THQ = torch.randn(T, H, 2 * q, device="cuda")
    keys = [torch.randn(H, n, q, device="cuda") / q**0.5 for _ in range(2)]
    q_int = torch.randint(-2, 3, (T, H, 2 * q), device="cuda").float()
    keys_int = [torch.randint(-2, 3, (H, n, q), device="cuda").float() for _ in range(2)]

    def unfused(qq, kk):
        return product_keys.product_topk(product_keys.subkey_scores_from_queries(qq, kk), K)

    ref_vals, ref_ids = unfused(q_THQ, keys)
    ref_int = unfused(q_int, keys_int)
    print(f"fused retrieval T={T} H={H} n={n} q={q} k={K}: unfused {bench(lambda: unfused(q_THQ, keys)):.3f} ms")
    for block_t, block_n, warps in configs:

        def run(qq=q_THQ, kk=keys, bt=block_t, bn=block_n, w=warps):
            return fused_retrieval(qq, kk, K, block_t=bt, block_n=bn, num_warps=w)

        try:
            vals, ids = run()
            exact_int = all(torch.equal(a, b) for a, b in zip(run(q_int, keys_int), ref_int, strict=True))
            ms = bench(run)
        except Exception as exc:  # a launch that does not compile (registers, shared memory) is reported
            print(f"fused block_t={block_t} block_n={block_n} warps={warps}: FAILED {exc!r:.300}")
            continue
        same = (ids == ref_ids).float().mean().item()
        dv = (vals - ref_vals).abs().max().item()
        print(f"fused block_t={block_t:3d} block_n={block_n:4d} warps={warps}: {ms:.3f} ms; ids equal {same:.5f}, "
              f"max|dval| {dv:.1e}; integer data exact {exact_int}")  # fmt: skip


def check_routing_backward() -> None:
    """Paper size: the Triton routing backward vs embedding_bag / index_add in float64 (relative RMS)."""
    import torch.nn.functional as F

    from llm.models.product_keys import retrieve_topk, unravel_ids

    T, H, n, q, K = 4096, 8, 1024, 64, 16
    q_THQ = torch.randn(T, H, 2 * q, device="cuda", requires_grad=True)
    keys = [(torch.randn(n, q, device="cuda") / q**0.5).requires_grad_() for _ in range(2)]
    scores, ids = retrieve_topk(q_THQ, keys, K)
    w = torch.randn_like(scores)
    got = torch.autograd.grad((scores * w).sum(), [q_THQ, *keys])
    coords = unravel_ids(ids, [n, n])
    w64 = w.double().reshape(T * H, K)
    dq = [
        F.embedding_bag(c.reshape(T * H, K), kk.double(), per_sample_weights=w64, mode="sum")
        for c, kk in zip(coords, keys, strict=True)
    ]
    q64 = q_THQ.detach().double().reshape(T * H, 2 * q)
    dk = [
        torch.zeros(n, q, device="cuda", dtype=torch.float64).index_add_(
            0, c.reshape(-1), (w64.unsqueeze(-1) * q64[:, p * q : (p + 1) * q].unsqueeze(1)).reshape(-1, q)
        )
        for p, c in enumerate(coords)
    ]
    want = [torch.cat(dq, -1).view(T, H, 2 * q), *dk]
    for name, a, b in zip(["dq", "dkeys0", "dkeys1"], got, want, strict=True):
        err = ((a.double() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
        print(f"routing backward {name}: rel RMS vs float64 reference {err:.2e}")


def sync_check() -> None:
    """One PEER layer fwd+bwd (dense table grads) under torch.cuda.set_sync_debug_mode('error')."""
    from llm.config.defaults import PEERConfig
    from llm.models.experts import PEER

    D, T = 1024, 4096
    for opt in ("adamw", "sparse_adam"):
        cfg = PEERConfig(num_experts=1024**2, product_key_dim=[1024, 1024], num_experts_per_tok=16, num_heads=8,
                         query_dim=128, kernel="triton", table_optimizer=opt)  # fmt: skip
        with torch.device("cuda"):
            layer = PEER(D, cfg).to(torch.bfloat16)
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        params = [x, *layer.parameters()]
        torch.autograd.grad(layer(x), params, torch.ones(T, D, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.autograd.grad(layer(x), params, torch.ones(T, D, device="cuda", dtype=torch.bfloat16))
            print(f"sync check, table_optimizer={opt}: no synchronizing CUDA call in fwd+bwd")
        except RuntimeError as exc:
            print(f"sync check, table_optimizer={opt}: SYNC: {str(exc).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
        del layer, params
        torch.cuda.empty_cache()


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
    ap.add_argument("--no-sweep", action="store_true", help="skip the top-k / merge timings")
    ap.add_argument("--fused", default="64,64,4", help="fused-kernel launches to time: ';'-separated "
                    "block_t,block_n,warps ('' for none)")  # fmt: skip
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.fused.split(";")] if args.fused else []
    if any(len(c) != 3 for c in configs):  # checked before any GPU time is spent
        ap.error(f"--fused: each launch is block_t,block_n,warps; got {args.fused!r}")
    print(torch.cuda.get_device_name())
    if not args.no_sweep:
        topk_sweep(32768, 1024, 16)
        topk_sweep(32768, 256, 16)
        merge_bench()
    if configs:
        fused_sweep(configs)
    check_routing_backward()
    sync_check()
    if args.profile_out:
        profile_layer(args.profile_out)


if __name__ == "__main__":
    main()
