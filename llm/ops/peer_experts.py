"""Dispatch of the PEER expert computation: fused Triton kernels on CUDA, the torch reference elsewhere.

``kernel``: "torch" always runs ``peer_experts_reference``; "triton" requires the Triton kernels
(``llm/ops/triton_peer_kernels.py``) and raises if they cannot be imported; "auto" uses Triton for CUDA
tensors and falls back to torch, logging the reason once, when the import fails.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

from torch import Tensor

from llm.ops.peer_reference import peer_experts_reference

logger = logging.getLogger(__name__)

KERNELS = ("auto", "triton", "torch")


@functools.cache
def _load_triton() -> tuple[Callable | None, str]:
    """(peer_experts_triton, "") or (None, why it is unavailable); cached so the import is tried once."""
    try:
        from llm.ops.triton_peer_kernels import peer_experts_triton
    except (ImportError, RuntimeError) as exc:  # no triton, no driver, or the module is not there yet
        return None, f"{type(exc).__name__}: {exc}"
    return peer_experts_triton, ""


@functools.cache
def _warn_fallback(reason: str) -> None:
    """Log once per distinct reason (lru_cache makes repeat calls no-ops)."""
    logger.warning("PEER kernel 'auto': Triton kernels unavailable (%s); using the torch reference", reason)


def peer_experts(
    x: Tensor,
    indices: Tensor,
    scores: Tensor,
    u: Tensor,
    v: Tensor,
    activation: str,
    g: Tensor | None = None,
    kernel: str = "auto",
    max_gather_bytes: int = 256 * 2**20,
    sparse_grad: bool = False,
) -> Tensor:
    """Expert outputs (T, D) for x (T, D), indices/scores (T, H, K), tables u, v, g (N, M, D).

    Same contract as ``peer_experts_reference`` (see ``llm/ops/peer_reference.py``). ``max_gather_bytes``
    applies to the torch path only; ``sparse_grad`` (Triton path only) returns the tables' gradients as
    sparse COO rows of the touched experts for the row-sparse optimiser; the torch path always returns
    dense gradients (which that optimiser also accepts).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: got {kernel!r}; allowed: {' | '.join(KERNELS)}")
    if kernel == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"model_config.peer_config.kernel: 'triton' needs a CUDA device (the input is on {x.device.type}); "
            "use 'auto' (Triton on CUDA, PyTorch elsewhere) or 'torch'"
        )
    if kernel == "triton" or (kernel == "auto" and x.is_cuda):
        fn, reason = _load_triton()
        if fn is not None:
            return fn(x, indices, scores, u, v, activation, g=g, sparse_grad=sparse_grad)
        if kernel == "triton":
            raise ValueError(
                f"model_config.peer_config.kernel: 'triton' but llm.ops.triton_peer_kernels could not be imported ({reason}); "
                "install triton or set peer_config.kernel to 'torch' or 'auto'"
            )
        _warn_fallback(reason)
    return peer_experts_reference(x, indices, scores, u, v, activation, g=g, max_gather_bytes=max_gather_bytes)
