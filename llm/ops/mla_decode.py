"""Absorbed MLA attention over the latent KV cache: the torch reference and the backend switch.

With W_UK folded into the query, every head attends over the same per-token vector
``[c_kv | k_pe]`` (L + R values) and the value is ``c_kv`` itself (the first L values); W_UV is applied
by the caller afterwards. Backends (``mla_config.decode_backend``):

- ``flash_mla``: DeepSeek's FlashMLA kernel (SM90 only; installed separately, imported lazily);
- ``triton``: ``llm/ops/triton_mla_decode.py`` (one pass over the cache, split along the sequence);
- ``torch``: ``mla_decode_reference`` below (two passes over the cache: scores, then values).

``auto`` picks the first available in that order and logs its choice once.

Shapes: B batch, Tq new (query) tokens, H heads, S cached tokens, L kv_lora_rank, R rope dims,
C = L + R. Query row t of a call sits at position ``start + t`` and sees cached tokens ``[0, start + t]``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

DECODE_BACKENDS = ("auto", "flash_mla", "triton", "torch")


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def mla_decode_reference(q: torch.Tensor, latent: torch.Tensor, start: int, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """Absorbed attention in plain torch (matmuls in the inputs' dtype, softmax in fp32).

    q (B, Tq, H, C) = [absorbed q_nope | roped q_pe]; latent (B, S >= start + Tq, C) = [c_kv | k_pe].
    Returns (B, Tq, H, L) in q's dtype: softmax(q . latent * scale) @ c_kv, causal from ``start``.
    """
    b, tq, h, c = q.shape
    s = start + tq
    kv = latent[:, :s].to(q.dtype)  # (B, S, C)
    scores = torch.matmul(q.reshape(b, tq * h, c), kv.transpose(1, 2)).float() * scale  # (B, Tq*H, S)
    if tq > 1:
        # Row (t, h) may see keys up to start + t; the single-token case needs no mask.
        limit = start + torch.arange(tq, device=q.device).repeat_interleave(h)  # (Tq*H,)
        hidden = torch.arange(s, device=q.device)[None, :] > limit[:, None]  # (Tq*H, S)
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.matmul(probs, kv[..., :kv_lora_rank])  # (B, Tq*H, L)
    return out.view(b, tq, h, kv_lora_rank)


def flash_mla_available(device: torch.device, kv_lora_rank: int = 512, rope_dim: int = 64, dtype=torch.bfloat16) -> tuple[bool, str]:
    """Whether FlashMLA can run on `device` for this cache, and why not."""
    if device.type != "cuda":
        return False, f"device is {device.type}, FlashMLA needs CUDA"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, f"GPU is sm{major}{minor}, FlashMLA's dense decode kernel needs sm90"
    if (kv_lora_rank, rope_dim) != (512, 64):
        return False, f"FlashMLA is built for kv_lora_rank 512 + rope 64, not {kv_lora_rank} + {rope_dim}"
    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"FlashMLA needs a bf16/fp16 cache, not {dtype}"
    if importlib.util.find_spec("flash_mla") is None:
        return False, "package flash_mla is not installed (see the README: build it from DeepSeek's FlashMLA)"
    return True, ""


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"device is {device.type} and TRITON_INTERPRET is not set"


def resolve_decode_backend(
    requested: str,
    device: torch.device,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    key: str = "mla_config.decode_backend",
) -> str:
    """Map ``auto`` to the best available backend for a cache of this shape and dtype on `device`;
    raise ``ValueError`` if a requested backend can't run."""
    if requested not in DECODE_BACKENDS:
        raise ValueError(f"{key}: got {requested!r}; allowed: {' | '.join(DECODE_BACKENDS)}")
    if requested == "flash_mla":
        ok, why = flash_mla_available(device, kv_lora_rank, rope_dim, dtype)
        if not ok:
            raise ValueError(f"{key}: got 'flash_mla' but {why}; use auto, triton or torch")
        return requested
    if requested == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise ValueError(f"{key}: got 'triton' but {why}; use auto or torch")
        return requested
    if requested == "torch":
        return requested
    ok, why = flash_mla_available(device, kv_lora_rank, rope_dim, dtype)
    if ok:
        choice = "flash_mla"
    elif device.type == "cuda" and _triton_usable(device)[0]:
        choice = "triton"
    else:
        choice = "torch"
    _log_once(f"MLA decode backend auto -> {choice}" + (f" (flash_mla unavailable: {why})" if not ok else ""))
    return choice


def _flash_mla_decode(q: torch.Tensor, cache, scale: float) -> torch.Tensor:
    import flash_mla  # optional, SM90 only

    b, tq, h, _ = q.shape
    # FlashMLA's default scale is C^-0.5 (576^-0.5), wrong for MLA: pass the true one.
    # Older releases compute the schedule here; 9241ae3 returns a placeholder filled on first use.
    metadata, num_splits = flash_mla.get_mla_metadata(cache.cache_seqlens, tq * h, 1)
    out, _ = flash_mla.flash_mla_with_kvcache(
        q,
        cache.kv,
        cache.block_table,
        cache.cache_seqlens,
        cache.kv_lora_rank,
        metadata,
        num_splits,
        softmax_scale=scale,
        causal=True,
    )
    return out  # (B, Tq, H, L)


def mla_decode(q: torch.Tensor, cache, start: int, scale: float, backend: str) -> torch.Tensor:
    """Absorbed attention of new tokens over a ``MLAKVCache`` that already holds them.

    q (B, Tq, H, L + R) in the cache's dtype; ``start`` = cached tokens before these Tq.
    backend: an already-resolved name (flash_mla | triton | torch). Returns (B, Tq, H, L).
    """
    assert cache.length == start + q.shape[1], "the new tokens must be appended before attending"
    if backend == "flash_mla":
        return _flash_mla_decode(q, cache, scale)
    if backend == "triton":
        from llm.ops.triton_mla_decode import mla_decode_triton

        return mla_decode_triton(q, cache.kv, cache.block_table, start, cache.kv_lora_rank, scale)
    return mla_decode_reference(q, cache.latent(), start, cache.kv_lora_rank, scale)
