"""Routing top-k on the GPU: the register top-k kernel vs the stable sort and torch.topk, plus exactness.

    python benchmarks/routing_topk.py

Rows are (token, head) pairs at the paper's size (T=4096, H=8): 32768 rows of 1024 sub-key scores, k=16,
and the 32768 x 256 merge grid. Times are CUDA-event medians (triton.testing.do_bench).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm.ops.triton_topk import topk_positions_reference, topk_positions_triton  # noqa: E402


def main() -> None:
    print(torch.cuda.get_device_name())
    for R, C, k in [(32768, 1024, 16), (32768, 256, 16), (131072, 1024, 16)]:
        scores = torch.randn(R, C, device="cuda")
        want = topk_positions_reference(scores, k)
        for tile in (4096, 8192, 16384):
            got = topk_positions_triton(scores, k, tile_elements=tile)
            exact = torch.equal(got, want)
            ms = triton.testing.do_bench(lambda: topk_positions_triton(scores, k, tile_elements=tile), return_mode="median")
            print(f"R={R:6d} C={C:5d} k={k}: kernel tile {tile:5d}: {ms:.3f} ms exact={exact}")
        ms_sort = triton.testing.do_bench(lambda: topk_positions_reference(scores, k), return_mode="median")
        ms_topk = triton.testing.do_bench(lambda: scores.topk(k, dim=-1), return_mode="median")
        print(f"R={R:6d} C={C:5d} k={k}: stable sort {ms_sort:.3f} ms, torch.topk {ms_topk:.3f} ms")


if __name__ == "__main__":
    main()
