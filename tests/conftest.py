"""Test-wide environment: nothing may touch the network, W&B is off, Triton runs on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton interpreter runs kernels on CPU tensors; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
