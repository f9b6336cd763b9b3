#!/usr/bin/env python
"""GPU smoke test and decode speed of FoundationModel.generate (latent KV cache vs re-running the sequence).

    python benchmarks/generation.py [--decode-backend auto|triton|torch|flash_mla]   # needs CUDA

1. configs/tiny.yaml in bf16: forward, loss + backward, greedy generation with and without the cache.
2. configs/config.yaml (1M experts x 4 PEER blocks, random weights) in bf16: prefill + greedy decode of
   a batch of prompts, with the cache and without, tokens/s (CUDA-synchronised wall clock; eager mode).
"""

from __future__ import annotations

import argparse
import time

import torch

from llm.config import load_config
from llm.models.foundation import FoundationModel


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def agreement(model, prompts, new: int) -> str:
    """Greedy cache vs no cache: tokens agreeing before the first divergence, and the first step's logit gap."""
    a = model.generate(prompts, new, temperature=0.0, use_cache=True)
    b = model.generate(prompts, new, temperature=0.0, use_cache=False)
    prefix = 0
    for s, t in zip(a, b, strict=True):
        prefix += next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s))
    ids = torch.tensor(prompts, device="cuda")
    with torch.no_grad():
        full = model(ids)[:, -1].float()
        cached = model(ids, caches=model.make_caches(len(prompts), ids.shape[1] + 1))[:, -1].float()
    gap = (full - cached).abs().max().item()
    return f"{prefix}/{sum(map(len, a))} tokens before divergence; prefill logits max |diff| {gap:.2e} (max |logit| {full.abs().max().item():.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-backend", default="auto", help="mla_config.decode_backend for both models")
    args = parser.parse_args()
    overrides = [f"model_config.mla_config.decode_backend={args.decode_backend}"]
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    rows = [("device", torch.cuda.get_device_name()), ("torch", torch.__version__), ("decode backend", args.decode_backend)]

    cfg = load_config("configs/tiny.yaml", overrides).model_config
    with torch.device("cuda"):
        tiny = FoundationModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 128), device="cuda")
    loss, parts = tiny.loss(ids, ids)
    loss.backward()
    rows.append(("tiny bf16 loss at init", f"{loss.item():.4f} (ln V = {torch.tensor(float(cfg.vocab_size)).log().item():.4f})"))
    rows.append(("tiny grads finite", str(all(p.grad is None or torch.isfinite(p.grad).all().item() for p in tiny.parameters()))))
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    rows.append(("tiny bf16 greedy cache vs no cache", agreement(tiny, prompts, 32)))
    tiny.float()
    rows.append(("tiny fp32 greedy cache vs no cache", agreement(tiny, prompts, 32)))
    del tiny

    cfg = load_config("configs/config.yaml", overrides).model_config
    with torch.device("cuda"):
        ref = FoundationModel(cfg)
    ref.eval()
    rows.append(("reference params", f"{sum(p.numel() for p in ref.parameters()):,}"))
    rows.append(("reference GPU memory after build", f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB"))
    batch, prompt_len, new = 8, 128, 128
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    ref.generate(prompts, 4, temperature=0.0)  # warm-up (kernels, autotuning)
    ref.generate(prompts, 4, temperature=0.0, use_cache=False)
    _, t_c = timed(lambda: ref.generate(prompts, new, temperature=0.0, use_cache=True))
    _, t_n = timed(lambda: ref.generate(prompts, new, temperature=0.0, use_cache=False))
    rows.append((f"reference decode B={batch} prompt={prompt_len} new={new}, cache", f"{batch * new / t_c:,.0f} tok/s ({t_c:.2f} s)"))
    rows.append((f"reference decode B={batch} prompt={prompt_len} new={new}, no cache", f"{batch * new / t_n:,.0f} tok/s ({t_n:.2f} s)"))
    rows.append(("reference bf16 greedy cache vs no cache", agreement(ref, prompts[:4], 16)))
    ref.float()
    rows.append(("reference fp32 greedy cache vs no cache", agreement(ref, prompts[:4], 16)))
    rows.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
