"""Run by torchrun in test_distributed.py: train while recording the sequences each rank trains on.

torchrun --standalone --nproc-per-node 2 tests/training/ddp_probe.py [--resume PATH] CONFIG KEY=VALUE ...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from llm.config import load_config
from llm.training import train as train_mod

seen: list[list[int]] = []
_real = train_mod.LossModule.forward


def _recording_forward(self, input_ids, labels, doc_ids=None):
    if self.training:
        seen.extend(input_ids.tolist())
    return _real(self, input_ids, labels, doc_ids)


train_mod.LossModule.forward = _recording_forward
weights: dict[str, float] = {}
_real_finish = train_mod.Loop.finish


def _recording_finish(self, state, status):
    # each rank's parameters at the end (before the final checkpoint): ranks must hold the same model
    weights["sum"] = float(sum(p.detach().double().sum() for p in self.model.parameters() if not hasattr(p, "placements")))
    return _real_finish(self, state, status)


train_mod.Loop.finish = _recording_finish
args = sys.argv[1:]
resume = None
if args[0] == "--resume":
    resume, args = args[1], args[2:]
config = load_config(args[0], args[1:])
result = train_mod.train(config, resume=resume)
out = Path(config.train_config.output_dir) / f"probe_rank{os.environ['RANK']}.json"
out.write_text(json.dumps({"status": result.status, "step": result.step, "tokens": result.tokens, "sequences": seen,
                           "perplexity": result.val.get("perplexity"), "weight_sum": weights.get("sum")}))  # fmt: skip
