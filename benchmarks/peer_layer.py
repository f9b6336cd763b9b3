"""PEER benchmark (GPU): expert computation, whole layer, table optimiser, against the baselines.

    python benchmarks/peer_layer.py --out results.jsonl                  # everything (~5 min on an H100)
    python benchmarks/peer_layer.py --only experts --sizes paper4k --sweep  # block-size sweep of the kernels
    python benchmarks/peer_layer.py --peer-pytorch .fetched               # add lucidrains/PEER-pytorch
    python benchmarks/peer_layer.py --only layers --profile-out prof.txt  # per-kernel and host-op profiles

Times are medians of CUDA-event timings (``triton.testing.do_bench``, which flushes L2 between runs).
Whole layers are also measured three more ways, because a one-layer eager step can be bound by the
host's op issue rather than the GPU: "GPU busy" (kernel times summed by torch.profiler), "host issue"
(host time to issue one step) and "back to back" (GPU time per step of steps queued behind a GPU sleep);
layer timings are taken in rounds, every variant once per round in a rotated order.
"Effective" bandwidth counts the bytes a gather must move: every selected table row once per selection
(repeats included) plus x and the output; it is compared with a device-to-device copy measured in the
same run (bytes read + bytes written). Peak memory is the allocator's peak during forward+backward minus
what was allocated before (it includes the returned gradients, e.g. dense table gradients).
PEER-pytorch (https://github.com/lucidrains/PEER-pytorch) is run from a fetched, never-committed copy.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # name: (D, N, H, K, T)
    "paper4k": (1024, 1024**2, 8, 16, 4096),
    "paper16k": (1024, 1024**2, 8, 16, 16384),
    "small": (512, 128**2, 4, 8, 4096),
}


@dataclass
class Row:
    size: str
    what: str
    impl: str
    ms: float
    tbps: float | None = None
    peak_gib: float | None = None
    note: str = ""


def bench(fn, warmup=10, rep=60) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth() -> float:
    """Device copy bandwidth in TB/s (bytes read + written) of a 2 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e9


def make_expert_inputs(D, N, H, K, T, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, D, device="cuda", dtype=dtype, generator=gen)
    u = (torch.randn(N, 1, D, device="cuda", dtype=dtype, generator=gen) * D**-0.5).requires_grad_()
    v = (torch.randn(N, 1, D, device="cuda", dtype=dtype, generator=gen) * D**-0.5).requires_grad_()
    # Uniform random experts: what a balanced router produces (distinct rows ~ 1 - exp(-T*H*K/N)).
    idx = torch.randint(0, N, (T, H, K), device="cuda", generator=gen)
    scores = torch.softmax(torch.randn(T, H, K, device="cuda", generator=gen), -1)
    dout = torch.randn(T, D, device="cuda", dtype=dtype, generator=gen)
    return x.requires_grad_(), idx, scores.requires_grad_(), u, v, dout


def fwd_bytes(D, H, K, T, elem=2) -> int:
    return T * H * K * 2 * D * elem + 2 * T * D * elem


def time_expert_impl(rows, size, name, fn, inputs, D, H, K, T):
    x, idx, scores, u, v, dout = inputs
    leaves = [x, scores, u, v]
    fwd = bench(lambda: fn(x, idx, scores, u, v))
    out = fn(x, idx, scores, u, v)
    bwd = bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True))

    def fwd_bwd():
        return torch.autograd.grad(fn(x, idx, scores, u, v), leaves, dout)

    both = bench(fwd_bwd)
    peak = peak_extra_gib(fwd_bwd)
    tb = fwd_bytes(D, H, K, T) / fwd / 1e9
    rows.append(Row(size, "experts fwd", name, fwd, tb))
    rows.append(Row(size, "experts bwd", name, bwd))
    rows.append(Row(size, "experts fwd+bwd", name, both, None, peak))


def sweep_kernels(rows, size, tpk, inputs, D, N, H, K, T):
    """Block sizes of the forward and of the backward's row pass, and the backward's pieces alone.

    The fastest configuration of each sweep is kept for the rest of the run (printed as "picked").
    """
    x, idx, s, u, v, dout = inputs
    for tile in (8192, 16384):
        for warps in (2, 4):
            tpk.TILE_ELEMENTS, tpk._num_warps = tile, (lambda bd, w=warps: w)
            ms = bench(lambda: tpk.peer_forward(x, idx, s, u, v, None, "gelu"))
            rows.append(Row(size, "sweep fwd", f"tile{tile}/w{warps}", ms, fwd_bytes(D, H, K, T) / ms / 1e9))
    best = min((r for r in rows if r.what == "sweep fwd" and r.size == size), key=lambda r: r.ms).impl
    tile, warps = (int(v) for v in best.replace("tile", "").replace("w", "").split("/"))
    tpk.TILE_ELEMENTS, tpk._num_warps = tile, (lambda bd, w=warps: w)
    rows.append(Row(size, "picked fwd/pass A config", best, float("nan")))
    _, pre, _ = tpk.peer_forward(x, idx, s, u, v, None, "gelu")
    ms = bench(lambda: tpk.peer_backward_tokens(dout, x, idx, s, u, v, None, pre, None, "gelu"))
    rows.append(Row(size, "piece: bwd pass A (token-major)", "triton", ms, fwd_bytes(D, H, K, T) / ms / 1e9))
    keys = idx.view(-1).to(torch.int32)
    rows.append(Row(size, "piece: torch.sort int32 keys", "torch", bench(lambda: torch.sort(keys))))
    srt = torch.sort(keys).values
    rows.append(
        Row(
            size, "piece: unique_consecutive", "torch", bench(lambda: torch.unique_consecutive(srt, return_counts=True))
        )
    )
    _, _, cu, cv, _ = tpk.peer_backward_tokens(dout, x, idx, s, u, v, None, pre, None, "gelu")
    R = int(tpk.touched_row_count(idx, N, 1).item())
    perm, srt_rows, seg = tpk.sort_rows(idx, 1, N, False, R)
    for block_s in (1, 2, 4, 8):
        for warps in (2, 4, 8):
            tpk.ROW_BLOCK_S, tpk.ROW_NUM_WARPS = block_s, warps
            ms = bench(
                lambda: tpk.peer_backward_rows(dout, x, cu, cv, None, perm, srt_rows, seg, (u, v, None), R)
            )
            rows.append(Row(size, "sweep bwd pass B (sparse)", f"S{block_s}/w{warps}", ms))
    best = min((r for r in rows if r.what.startswith("sweep bwd") and r.size == size), key=lambda r: r.ms).impl
    tpk.ROW_BLOCK_S, tpk.ROW_NUM_WARPS = (int(v) for v in best.replace("S", "").replace("w", "").split("/"))
    rows.append(Row(size, "picked pass B config", best, float("nan")))


def run_experts(rows, size, sweep):
    from llm.ops import triton_peer_kernels as tpk
    from llm.ops.peer_reference import peer_experts_reference

    D, N, H, K, T = SIZES[size]
    inputs = make_expert_inputs(D, N, H, K, T)
    if sweep:
        sweep_kernels(rows, size, tpk, inputs, D, N, H, K, T)
    for label, kw in (("triton dense-grad", {}), ("triton sparse-grad", {"sparse_grad": True})):
        fn = lambda x, i, s, u, v, kw=kw: tpk.peer_experts_triton(x, i, s, u, v, "gelu", **kw)  # noqa: E731
        time_expert_impl(rows, size, label, fn, inputs, D, H, K, T)
    # Pieces of the backward, to see where its time goes.
    x, idx, s, u, v, dout = inputs
    rows.append(Row(size, "piece: sort+segment", "triton", bench(lambda: tpk.sort_rows(idx, 1, N, False))))
    rows.append(
        Row(size, "piece: zero 2 bf16 grad tables", "torch", bench(lambda: (torch.zeros_like(u), torch.zeros_like(v))))
    )
    ref = lambda x, i, s, u, v: peer_experts_reference(x, i, s, u, v, "gelu")  # noqa: E731
    time_expert_impl(rows, size, "torch reference", ref, inputs, D, H, K, T)
    return inputs


def run_compiled_reference(rows, size):
    from llm.ops.peer_reference import peer_experts_reference

    D, N, H, K, T = SIZES[size]
    inputs = make_expert_inputs(D, N, H, K, T)
    compiled = torch.compile(lambda x, i, s, u, v: peer_experts_reference(x, i, s, u, v, "gelu"))
    t0 = time.time()
    try:
        torch.autograd.grad(compiled(*inputs[:5]), [inputs[0], inputs[2], inputs[3], inputs[4]], inputs[5])
    except Exception as exc:  # report, don't hide: the row says why compile could not run
        rows.append(
            Row(size, "experts fwd+bwd", "torch.compile(reference)", float("nan"), note=f"failed: {exc!r}"[:200])
        )
        return
    note = f"compile {time.time() - t0:.0f} s"
    time_expert_impl(rows, size, "torch.compile(reference)", compiled, inputs, D, H, K, T)
    rows[-1].note = note


# Layer fwd+bwd timings are taken in rounds, every variant once per round in a rotated order, and the
# median over rounds is reported: within one process the variant measured first used to come out slower
# than the same code measured later, so one long measurement per variant favoured whoever came last.
LAYER_ROUNDS = 7


def gpu_busy_ms(fn, steps=5) -> tuple[float, list[tuple[str, float]], list[tuple[str, float, int]]]:
    """GPU time per call summed over its kernels (torch.profiler), the kernels' ms per call, and the host
    side: (op, self CPU ms per call, calls per call) of every CPU op, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    per_call = sorted(((e.key, e.device_time_total / 1e3 / steps) for e in kernels), key=lambda kv: -kv[1])
    cpu = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in events if e.device_type.name == "CPU"]
    return sum(ms for _, ms in per_call), per_call, sorted(cpu, key=lambda r: -r[1])


def sync_check(fn) -> str:
    """One call under torch's sync debug mode: "no synchronising call", or the first one's message. A host
    wait inside a step (e.g. a pageable host-to-device copy) makes every timing of it host-bound. The sparse
    gradients' wait for R is an event wait, which this mode does not report (host_and_back_to_back_ms
    times it apart)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "no synchronising call"
    except RuntimeError as exc:
        return f"SYNC: {str(exc).splitlines()[0][:150]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def host_and_back_to_back_ms(fn, steps=8) -> tuple[float, float, float]:
    """(host ms, GPU ms, R-wait ms) per call when calls are issued back to back, as in a training loop.

    The GPU first sleeps long enough for the host to queue every call, so the GPU time (events around the
    calls) has no launch gaps unless the host itself falls behind, and the host time (perf_counter) is the
    time to issue one call; the host's waits for the row count R (``RowCount.get``: the sparse gradients'
    size, which the same call's forward computes) are timed apart and not counted as issue time.
    """
    from llm.ops import triton_peer_kernels as tpk

    waited = [0.0]
    get = tpk.RowCount.get

    def timed_get(self):
        t0 = time.perf_counter()
        try:
            return get(self)
        finally:
            waited[0] += time.perf_counter() - t0

    fn()
    torch.cuda.synchronize()
    tpk.RowCount.get = timed_get
    try:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(200_000_000)  # ~100 ms at H100 clocks
        start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        host = time.perf_counter() - t0
        end.record()
        torch.cuda.synchronize()
    finally:
        tpk.RowCount.get = get
    return (host - waited[0]) * 1e3 / steps, start.elapsed_time(end) / steps, waited[0] * 1e3 / steps


def host_profile(fn, steps=10, top=45) -> str:
    """cProfile of ``steps`` calls: the host functions with the most own time (Triton's launcher, torch
    ops' Python bindings, autograd), largest first. The sparse gradients' wait for R shows as an event
    ``synchronize``."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def launch_overhead(rows, size, calls=300):
    """Host time per call (no sync, tiny inputs): one Triton launch through its JIT path, the forward
    launcher around it, and one small torch op, for scale."""
    from llm.ops import triton_peer_kernels as tpk

    D, N, H, K, _ = SIZES[size]
    x, idx, s, u, v, _ = make_expert_inputs(D, 64, H, K, 8)
    out, pre = torch.empty_like(x), torch.empty(8, H * K, device="cuda")
    block_e, block_d = tpk._blocks(D, H * K)
    pieces = {
        "triton launch (forward kernel)": lambda: tpk._peer_fwd_kernel[(8,)](
            x, idx, s, u, v, u, out, pre, pre, D, H * K, H * K, M=1, ACT=0, GLU=False,
            BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4,
        ),  # fmt: skip
        "peer_forward launcher": lambda: tpk.peer_forward(x, idx, s, u, v, None, "gelu"),
        "torch.add": lambda: torch.add(x, x),
    }
    for name, fn in pieces.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t0) * 1e6 / calls
        torch.cuda.synchronize()
        rows.append(Row(size, "host us per call", name, us))


def run_layers(rows, size, peer_pytorch_dir, profile_out=""):
    from llm.config.defaults import PEERConfig
    from llm.models import product_keys
    from llm.models.experts import PEER, SwiGLU

    D, N, H, K, T = SIZES[size]
    side = int(math.isqrt(N))
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(x)
    builders, flags = {}, {}  # flags: fused routing on/off while the variant runs
    cfg = PEERConfig(num_experts=N, product_key_dim=[side, side], num_experts_per_tok=K, num_heads=H, query_dim=128,
                     kernel="triton")  # fmt: skip
    builders["ours (triton)"] = lambda: PEER(D, cfg)
    # table_optimizer sparse_adam makes the layer return row-sparse table gradients (no dense zeroing)
    sparse = "ours (triton, sparse table grads)"
    builders[sparse] = lambda: PEER(D, replace(cfg, table_optimizer="sparse_adam"))
    # the same, with the routing forward unfused (score GEMMs, per-part top-k, merge: three kernels)
    unfused = f"{sparse}, unfused routing"
    builders[unfused] = builders[sparse]
    flags[unfused] = False
    builders["ours (torch ref)"] = lambda: PEER(D, replace(cfg, kernel="torch"))
    if peer_pytorch_dir:
        sys.path.insert(0, str(Path(peer_pytorch_dir).resolve()))
        from PEER_pytorch.PEER import PEER as LucidPEER

        builders["PEER-pytorch"] = lambda: LucidPEER(D, heads=H, num_experts=N, num_experts_per_head=K, dim_key=128,
                                                     non_competing_scores=False)  # fmt: skip
    f_equal = max(1, round(2 * H * K / 3))  # 3*D*f = 2*H*K*D: the same parameters active per token
    builders[f"dense SwiGLU f={f_equal} (equal active params)"] = lambda: SwiGLU(D, f_equal)
    builders[f"dense SwiGLU f={4 * D}"] = lambda: SwiGLU(D, 4 * D)

    def set_flags(name):
        product_keys.FUSED_RETRIEVAL = flags.get(name, True)

    built, runs = {}, {}  # variants of one builder share its layer (same weights, other flags)
    for name, build in builders.items():
        set_flags(name)
        if id(build) not in built:
            with torch.device("cuda"):  # initialise the 2^20-row tables on the GPU, not the CPU
                built[id(build)] = build().to(dtype=torch.bfloat16)
        layer = built[id(build)]
        params = [p for p in layer.parameters() if p.requires_grad]

        def run(layer=layer, params=params):
            return torch.autograd.grad(layer(x.unsqueeze(0)).squeeze(0), [x, *params], dout)

        runs[name] = run
        if name == "ours (triton)":
            rows.append(Row(size, "piece: routing retrieve() fwd", name, bench(lambda layer=layer: layer.retrieve(x))))

            def retrieve_fwd_bwd(layer=layer):
                scores, _ = layer.retrieve(x)
                routing = [x, layer.query.weight, *layer.sub_keys]
                return torch.autograd.grad(scores, routing, torch.ones_like(scores), allow_unused=True)

            rows.append(Row(size, "piece: routing retrieve() fwd+bwd", name, bench(retrieve_fwd_bwd)))

            def topk_routing(layer=layer):  # plain torch.topk product keys: same experts up to tie order
                a, b = layer.subkey_scores(x)
                (sa, ia), (sb, ib) = a.topk(K, dim=-1), b.topk(K, dim=-1)
                cand = (sa.unsqueeze(-1) + sb.unsqueeze(-2)).flatten(-2)
                best, pos = cand.topk(K, dim=-1)
                return best, (ia.unsqueeze(-1) * side + ib.unsqueeze(-2)).flatten(-2).gather(-1, pos)

            rows.append(Row(size, "piece: routing with torch.topk fwd", "torch", bench(topk_routing)))
        rows.append(Row(size, "layer fwd", name, bench(lambda layer=layer: layer(x.unsqueeze(0)))))
        peak = peak_extra_gib(run)
        rows.append(Row(size, "layer peak", name, float("nan"), None, peak))
        if name.startswith("ours (triton") or name == "PEER-pytorch":
            busy, kernels, cpu_ops = gpu_busy_ms(run)
            rows.append(Row(size, "layer fwd+bwd GPU busy", name, busy, note=f"{len(kernels)} distinct kernels"))
            rows.append(Row(size, "layer fwd+bwd sync check", name, float("nan"), note=sync_check(run)))
            if profile_out:
                with open(profile_out, "a") as f:
                    f.write(f"## {size} {name}: {busy:.3f} ms GPU busy per step\n")
                    f.writelines(f"{ms:8.4f}  {key[:160]}\n" for key, ms in kernels)
                    f.write("### host: self CPU ms per step (under the profiler), calls per step, op\n")
                    f.writelines(f"{ms:8.4f} {n:4d}  {key[:120]}\n" for key, ms, n in cpu_ops)
                    f.write(f"### host: cProfile of 10 steps\n{host_profile(run)}\n")
    # per variant and round: do_bench time, and (ours, PEER-pytorch) host issue time and back-to-back time
    times: dict[str, list[list[float]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(LAYER_ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            set_flags(name)
            sample = [bench(runs[name], warmup=3, rep=40)]
            if name.startswith("ours (triton") or name == "PEER-pytorch":
                host, gpu, _ = host_and_back_to_back_ms(runs[name])
                sample += [host, gpu]
            times[name].append(sample)
    labels = ("layer fwd+bwd", "layer fwd+bwd host issue time", "layer fwd+bwd back to back (no L2 flush)")
    for name, samples in times.items():
        for label, ts in zip(labels, map(sorted, zip(*samples, strict=True)), strict=False):
            note = f"median of {len(ts)} rounds, range {ts[0]:.3f}-{ts[-1]:.3f}"
            rows.append(Row(size, label, name, ts[len(ts) // 2], note=note))
    set_flags("")
    del built, runs
    torch.cuda.empty_cache()


def run_optimizer(rows, size):
    from llm.ops.row_sparse_adam import RowSparseAdamW
    D, N, H, K, T = SIZES[size]
    idx = torch.randint(0, N, (T, H, K), device="cuda")
    experts = torch.unique(idx)  # the touched rows, ascending
    frac = experts.numel() / N
    note = f"{frac:.1%} rows touched"
    for label, pdtype, sdtype in (("fp32 params, fp32 moments", torch.float32, None),
                                  ("bf16 params, fp32 moments", torch.bfloat16, torch.float32),
                                  ("fp32 params, bf16 moments", torch.float32, torch.bfloat16)):  # fmt: skip
        tables = [torch.nn.Parameter(torch.randn(N, 1, D, device="cuda", dtype=pdtype) * 0.02) for _ in range(2)]
        values = torch.randn(experts.numel(), 1, D, device="cuda", dtype=pdtype)
        for p in tables:
            p.grad = torch.sparse_coo_tensor(experts[None], values, p.shape, is_coalesced=True, check_invariants=False)
        opt = RowSparseAdamW(tables, lr=1e-3, state_dtype=sdtype)
        rows.append(
            Row(size, "table optimiser step", f"row-sparse AdamW, {label}", bench(opt.step, rep=100), note=note)
        )
        del opt, tables, values
        torch.cuda.empty_cache()
    tables = [torch.nn.Parameter(torch.randn(N, 1, D, device="cuda") * 0.02) for _ in range(2)]
    for p in tables:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(tables, lr=1e-3, fused=True)
    rows.append(Row(size, "table optimiser step", "dense fused AdamW, fp32", bench(opt.step, rep=100), note="all rows"))
    del opt, tables
    torch.cuda.empty_cache()


def check_correctness(rows, size):
    """Triton vs reference at benchmark scale (bf16 inputs, fp32 reference on the same values)."""
    from llm.ops.peer_reference import peer_experts_reference
    from llm.ops.triton_peer_kernels import peer_experts_triton

    D, N, H, K, T = SIZES[size]
    x, idx, s, u, v, dout = make_expert_inputs(D, N, H, K, T)
    leaves = [x, s, u, v]
    got = [peer_experts_triton(x, idx, s, u, v, "gelu")]
    got += torch.autograd.grad(got[0], leaves, dout)
    up = [t.detach().float().requires_grad_() for t in leaves]
    ref = [peer_experts_reference(up[0], idx, up[1], up[2], up[3], "gelu")]
    ref += torch.autograd.grad(ref[0], up, dout.float())
    for name, a, b in zip(["out", "dx", "dscores", "du", "dv"], got, ref, strict=True):
        a, b = a.double(), b.double()
        err = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
        rows.append(Row(size, f"check {name}", "triton vs fp32 reference", float("nan"), note=f"rel RMS {err:.2e}"))


def code_digest() -> str:
    """sha256 (12 hex digits) of the package's and this script's sources: names the code that ran even
    where the checkout's git metadata is stale (a copied working tree); compare with a local run of
    ``python -c "from benchmarks.peer_layer import code_digest; print(code_digest())"``."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.joinpath("llm").rglob("*.py"), Path(__file__).resolve()]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="paper4k,paper16k,small")
    ap.add_argument("--only", default="check,experts,layers,optimizer,compile", help="also: launch")
    ap.add_argument("--sweep", action="store_true", help="sweep the forward's tile size and warps")
    ap.add_argument("--peer-pytorch", default="", help="folder holding a fetched PEER_pytorch package")
    ap.add_argument("--out", default="", help="append one JSON line per measurement to this file")
    ap.add_argument("--profile-out", default="", help="append each layer's per-kernel GPU times, host ops and a cProfile of its host side to this file")
    args = ap.parse_args(argv)
    parts = args.only.split(",")
    rows: list[Row] = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, commit=commit or "none",
                  code=code_digest(),
                  triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%d"))  # fmt: skip
    print(json.dumps(header), flush=True)
    rows.append(Row("-", "device copy", "torch copy_", float("nan"), copy_bandwidth()))
    sizes = args.sizes.split(",")
    steps = [
        (name, size, fn)
        for size in sizes
        for name, fn in (
            ("check", lambda size=size: check_correctness(rows, size)),
            # block sizes are swept once, on the first size, and kept for the others
            ("experts", lambda size=size: run_experts(rows, size, args.sweep and size == sizes[0])),
            ("launch", lambda size=size: launch_overhead(rows, size)),
            ("layers", lambda size=size: run_layers(rows, size, args.peer_pytorch, args.profile_out)),
            # the optimiser is measured at the paper's size only (its tables take 32 GiB with AdamW state)
            ("optimizer", lambda size=size: run_optimizer(rows, size) if size == "paper4k" else None),
        )
    ]
    # torch.compile last: its compile time is unknown, so it must not hold up the other measurements
    steps.append(("compile", "paper4k", lambda: run_compiled_reference(rows, "paper4k")))
    for name, _size, step in steps:
        if name not in parts:
            continue
        start = len(rows)
        step()
        torch.cuda.empty_cache()
        for r in rows[start:]:
            line = json.dumps({**header, **r.__dict__})
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    print(f"\n{'size':9} {'what':30} {'impl':44} {'ms':>8} {'TB/s':>6} {'peakGiB':>7}  note")
    for r in rows:
        tb = f"{r.tbps:6.2f}" if r.tbps else ""
        pk = f"{r.peak_gib:7.2f}" if r.peak_gib is not None else ""
        print(f"{r.size:9} {r.what:30} {r.impl:44} {r.ms:8.3f} {tb:>6} {pk:>7}  {r.note}")


if __name__ == "__main__":
    main()
