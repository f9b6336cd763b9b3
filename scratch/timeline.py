"""GPU timeline of the expert fwd+bwd (sparse grads) at the paper's size: kernels, gaps, host ops."""
import json, sys, os
import torch
sys.path.insert(0, os.getcwd())
from benchmarks.peer_layer import make_expert_inputs
from llm.ops import triton_peer_kernels as tpk
import triton

D, N, H, K, T = 1024, 2**20, 8, 16, 4096
x, idx, s, u, v, dout = make_expert_inputs(D, N, H, K, T)
leaves = [x, s, u, v]
def step():
    return torch.autograd.grad(tpk.peer_experts_triton(x, idx, s, u, v, "gelu", sparse_grad=True), leaves, dout)
for _ in range(5): step()
torch.cuda.synchronize()
print("do_bench fwd+bwd", triton.testing.do_bench(step, return_mode="median"))
cache = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        cache.zero_()
        step()
    torch.cuda.synchronize()
prof.export_chrome_trace("/tmp/trace.json")
tr = json.load(open("/tmp/trace.json"))["traceEvents"]
gpu = sorted([e for e in tr if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e], key=lambda e: e["ts"])
cpu = [e for e in tr if e.get("cat") in ("cpu_op", "python_function", "user_annotation", "cuda_runtime") and "dur" in e]
# last step only: after the last memset of 1 GiB-ish (the cache flush)
flush = [i for i, e in enumerate(gpu) if ("fill" in e["name"].lower() or "memset" in e["name"].lower()) and e["dur"] > 30]
start = flush[-1]
prev_end = gpu[start]["ts"] + gpu[start]["dur"]
t0 = prev_end
for e in gpu[start + 1:]:
    gap = e["ts"] - prev_end
    print(f"{e['ts'] - t0:9.1f} gap {gap:7.1f} dur {e['dur']:7.1f}  {e['name'][:90]}")
    prev_end = e["ts"] + e["dur"]
print("last step span from flush end to last kernel end (us):", prev_end - t0)
# host: runtime calls in the last step with their start offsets
rt = sorted([e for e in cpu if e.get("cat") == "cuda_runtime" and e["ts"] >= t0 - 3000], key=lambda e: e["ts"])
ops = sorted([e for e in cpu if e.get("cat") == "cpu_op" and e["ts"] >= t0 - 3000 and e["dur"] > 20], key=lambda e: e["ts"])
print("host ops > 20us:")
for e in ops:
    print(f"{e['ts'] - t0:9.1f} dur {e['dur']:7.1f} {e['name'][:80]}")
print("runtime calls > 20us:")
for e in rt:
    if e["dur"] > 20:
        print(f"{e['ts'] - t0:9.1f} dur {e['dur']:7.1f} {e['name'][:80]}")
