"""GPU timeline of one PEER expert forward+backward step (sparse table gradients) at the paper's size.

    python benchmarks/peer_timeline.py [--tokens 4096]

Prints every kernel, memcpy and memset of the last profiled step in order, with its start (µs from the
end of the L2 flush that precedes the step), the idle gap before it and its duration, then the host ops
and CUDA runtime calls over 20 µs. It shows whether a step is GPU-bound (small gaps: its time is the
sum of its kernels) or waits on the host (benchmarks/RESULTS.md, fourth session, run 4).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer_layer import make_expert_inputs  # noqa: E402
from llm.ops import triton_peer_kernels as tpk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    D, N, H, K = 1024, 2**20, 8, 16
    x, idx, s, u, v, dout = make_expert_inputs(D, N, H, K, args.tokens)
    leaves = [x, s, u, v]

    def step():
        return torch.autograd.grad(tpk.peer_experts_triton(x, idx, s, u, v, "gelu", sparse_grad=True), leaves, dout)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: do_bench fwd+bwd {triton.testing.do_bench(step, return_mode='median'):.3f} ms")
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")  # as do_bench clears L2
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            flush.zero_()
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                 key=lambda e: e["ts"])  # fmt: skip
    # the last step begins after the last long fill (the flush; the step's own fills take a few µs)
    start = max(i for i, e in enumerate(gpu) if ("fill" in e["name"].lower() or "memset" in e["name"].lower()) and e["dur"] > 30)
    t0 = prev_end = gpu[start]["ts"] + gpu[start]["dur"]
    print(f"{'start us':>9} {'gap':>7} {'dur':>7}  kernel")
    for e in gpu[start + 1 :]:
        print(f"{e['ts'] - t0:9.1f} {e['ts'] - prev_end:7.1f} {e['dur']:7.1f}  {e['name'][:90]}")
        prev_end = e["ts"] + e["dur"]
    print(f"step: {prev_end - t0:.1f} us from the flush's end to the last kernel's end")
    for cat, title in (("cpu_op", "host ops"), ("cuda_runtime", "CUDA runtime calls")):
        slow = sorted((e for e in events if e.get("cat") == cat and "dur" in e and e["ts"] >= t0 - 3000 and e["dur"] > 20),
                      key=lambda e: e["ts"])  # fmt: skip
        print(f"{title} over 20 us (start relative to the flush's end):")
        for e in slow:
            print(f"{e['ts'] - t0:9.1f} {e['dur']:7.1f}  {e['name'][:80]}")


if __name__ == "__main__":
    main()
