"""Multi-head Latent Attention (DeepSeek-V2/V3, arXiv 2405.04434 §2.1; DeepSeek-V3 ``inference/model.py``).

    q           = wq(x)                       or  wq_b(q_norm(wq_a(x)))          (B, T, H, nope + R)
    [c_kv|k_pe] = wkv_a(x);  c_kv = kv_norm(c_kv)                                 (B, T, L), (B, T, R)
    RoPE on q's last R dims and on k_pe (one rope key shared by all heads)
    expanded  (training / prefill without a cache):
        [k_nope|v] = wkv_b(c_kv)                                                  (B, T, H, nope + V)
        o = softmax(q . [k_nope|k_pe] * scale) v          through an SDPA / flex backend
    absorbed  (with a cache; W_UK, W_UV are wkv_b's two row groups):
        o = (softmax([q_nope W_UK | q_pe] . [c_kv|k_pe] * scale) c_kv) W_UV^T      over the latent cache
    y = wo(o)

Both paths give the same function of the weights (tested in fp32). Rope layout and YaRN: ``rope.py``.

Shapes: B batch, T tokens, D model width, H heads, L kv_lora_rank, R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim, S cached tokens.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from llm.config.defaults import MLAConfig
from llm.config.validation import validate_mla_config
from llm.models.kv_cache import MLAKVCache
from llm.models.norm import RMSNorm
from llm.models.rope import RotaryEmbedding, apply_rope, softmax_scale
from llm.ops.mla_decode import mla_decode, resolve_decode_backend

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "flex", "math")


def _log_once(message: str) -> None:
    if not torch.compiler.is_compiling():  # a logging call would break the compiled graph
        _log_once_eager(message)


@functools.cache
def _log_once_eager(message: str) -> None:
    logger.info(message)


# ----------------------------------------------------------------------------------------
# Expanded attention backends
# ----------------------------------------------------------------------------------------


def resolve_attention_backend(requested: str, q: torch.Tensor, v: torch.Tensor, masked: bool) -> str:
    """Map ``auto`` to a backend for these inputs; ``default`` means torch's own SDPA choice.

    CUDA: cuDNN SDPA measured fastest for MLA's qk 192 / v 128 on Hopper (GUIDE §3: fwd+bwd 420 TFLOP/s at
    S=4k vs 187 for flash with v padded, 48 for efficient); FLASH refuses unequal head dims; document masks
    go to flex (a block-sparse mask; SDPA backends would need a dense (B, T, T) mask). CPU: torch's default.
    """
    if requested != "auto":
        return requested
    if q.device.type != "cuda":
        choice = "default"
    elif masked:
        choice = "flex"
    elif q.dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability(q.device)[0] >= 9:
        choice = "cudnn"
    elif q.dtype in (torch.bfloat16, torch.float16):
        choice = "flash"  # v zero-padded to the qk width when they differ (see causal_attention)
    else:
        choice = "efficient"
    _log_once(f"MLA attention backend auto -> {choice} ({q.device.type}, {q.dtype}, qk {q.shape[-1]} / v {v.shape[-1]}, masked={masked})")
    return choice


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is only fast when compiled (eager falls back to a dense reference).
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    # Eager create_block_mask materialises a dense (B, 1, T, T) mask first: 7.8 ms and 1.25 GiB at
    # B=8, T=4096 on an H200, against 0.25 ms compiled (code review measurement, 2026-11-27).
    return torch.compile(create_block_mask, dynamic=False)


class DocumentMask:
    """Causal-within-document masking of packed sequences, built once per forward and shared by all layers.

    doc_ids (B, T) int: a token attends only to earlier tokens with the same id. The flex block mask is
    built on first use and reused by every layer (and by activation-checkpoint recomputation).
    """

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids  # (B, T)
        self._flex_block_mask = None

    def flex_block_mask(self):
        if self._flex_block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            doc_ids = self.doc_ids
            b, t = doc_ids.shape

            def causal_in_doc(b_idx, h_idx, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (doc_ids[b_idx, q_idx] == doc_ids[b_idx, kv_idx])

            build = _compiled_create_block_mask() if doc_ids.is_cuda else create_block_mask
            self._flex_block_mask = build(causal_in_doc, b, None, t, t, device=doc_ids.device)
        return self._flex_block_mask

    def dense(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where attention is allowed (for SDPA backends)."""
        t = self.doc_ids.shape[1]
        same_doc = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=self.doc_ids.device).tril()
        return (same_doc & causal)[:, None]


def as_document_mask(doc_ids: torch.Tensor | DocumentMask | None) -> DocumentMask | None:
    return doc_ids if doc_ids is None or isinstance(doc_ids, DocumentMask) else DocumentMask(doc_ids)


def _flex_attention(q, k, v, scale: float, doc_mask: DocumentMask | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if doc_mask is None:
        t = q.shape[2]

        def causal(b_idx, h_idx, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, t, t, device=q.device)
    else:
        block_mask = doc_mask.flex_block_mask()
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale)


_SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    doc_ids: torch.Tensor | DocumentMask | None,
    backend: str,
) -> torch.Tensor:
    """Causal (block-causal within documents when doc_ids is given) attention.

    q, k (B, H, T, N + R); v (B, H, T, V); doc_ids (B, T), a DocumentMask, or None. Returns (B, H, T, V).
    backend: auto | cudnn | flash | efficient | flex | math (``mla_config.attention_backend``); a named
    backend that cannot run these inputs raises ``ValueError`` with torch's reasons in the warnings above it.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    doc_mask = as_document_mask(doc_ids)
    choice = resolve_attention_backend(backend, q, v, masked=doc_mask is not None)
    if choice == "flex":
        try:
            return _flex_attention(q, k, v, scale, doc_mask)
        except NotImplementedError as err:  # e.g. no backward on CPU: a named backend that cannot run
            raise ValueError(
                f"mla_config.attention_backend: 'flex' cannot run q {tuple(q.shape)} {q.dtype} on "
                f"{q.device.type} (torch: {str(err).splitlines()[0]}); "
                f"allowed: {' | '.join(ATTENTION_BACKENDS)} — 'auto' picks one that can"
            ) from err
    if doc_mask is None:
        mask, causal = None, True
    else:
        mask, causal = doc_mask.dense(), False  # (B, 1, T, T)
    if choice == "default":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    v_dim = v.shape[-1]
    if choice == "flash" and v_dim < q.shape[-1]:
        # SDPA's flash kernel needs equal head dims; zero value columns leave the real ones unchanged.
        # H200, qk 192 / v 128, fwd+bwd at S=4k: 187 TFLOP/s padded vs 48 for the efficient kernel (GUIDE §3).
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    try:
        with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[choice])]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
            return out[..., :v_dim]
    except RuntimeError as err:
        # torch words it "No available kernel" (2.11) or "No viable backend" (2.13); anything else is real.
        if "No available kernel" not in str(err) and "No viable backend" not in str(err):
            raise
        v = v[..., :v_dim]
        detail = (
            f"q {tuple(q.shape)} {q.dtype} on {q.device.type}, v head dim {v_dim}, "
            f"{'document mask' if mask is not None else 'causal'}"
        )
        if backend == "auto":
            # auto must not fail: say why once and let torch pick.
            _log_once(f"MLA attention backend {choice} cannot run {detail}; using torch's default SDPA choice")
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        raise ValueError(
            f"mla_config.attention_backend: {backend!r} cannot run {detail} (torch: {err}); "
            f"allowed: {' | '.join(ATTENTION_BACKENDS)} — 'auto' picks one that can"
        ) from err


def assemble_qkv(q, kv, k_pe, cos, sin, nope_dim: int):
    """Rope and concatenate the expanded path's inputs.

    q (B, T, H, N + R) un-roped; kv (B, T, H, N + V) = wkv_b(c_kv); k_pe (B, T, R) un-roped.
    Returns q, k (B, T, H, N + R) roped, and v (B, T, H, V).
    """
    b, t, h, _ = q.shape
    rope = q.shape[-1] - nope_dim
    q = torch.cat([q[..., :nope_dim], apply_rope(q[..., nope_dim:], cos, sin)], dim=-1)
    k_pe = apply_rope(k_pe, cos, sin)[:, :, None].expand(b, t, h, rope)  # one rope key shared by every head
    k = torch.cat([kv[..., :nope_dim], k_pe], dim=-1)
    return q, k, kv[..., nope_dim:]


@functools.cache
def _compiled_assemble_qkv():
    return torch.compile(assemble_qkv, dynamic=None)


def _glue_for(device: torch.device):
    # Eager, the rope and concatenations are ~10 elementwise kernels each way; compiled on CUDA they fuse
    # into a few (CPU keeps eager: compiling there costs more than it saves on test-sized inputs).
    return _compiled_assemble_qkv() if device.type == "cuda" else assemble_qkv


# ----------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------


class MultiHeadLatentAttention(nn.Module):
    """MLA with DeepSeek's weight names (wq | wq_a, q_norm, wq_b; wkv_a, kv_norm, wkv_b; wo), no biases.

    Args:
        dim: model width D.
        config: the MLA section (``MLAConfig``).
        max_seq_len: longest sequence the model serves; the largest cache ``make_cache`` allows.
    """

    def __init__(self, dim: int, config: MLAConfig, max_seq_len: int) -> None:
        super().__init__()
        validate_mla_config(config)
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len: got {max_seq_len}; must be >= 1")
        self.config = config
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.num_heads = config.num_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = softmax_scale(config)
        h = self.num_heads

        if config.q_lora_rank == 0:
            self.wq = nn.Linear(dim, h * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank)
            self.wq_b = nn.Linear(config.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_head_dim), bias=False)
        self.wo = nn.Linear(h * self.v_head_dim, dim, bias=False)
        self.rotary = RotaryEmbedding(config)

    def make_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16
    ) -> MLAKVCache:
        """An empty latent cache for this layer: ``batch_size`` sequences of up to ``max_len`` tokens."""
        if max_len > self.max_seq_len:
            raise ValueError(f"max_len: got {max_len}; must be <= max_seq_len={self.max_seq_len}")
        return MLAKVCache(batch_size, max_len, self.kv_lora_rank, self.rope_dim, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: MLAKVCache | None = None,
        doc_ids: torch.Tensor | DocumentMask | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        positions (T,) or (B, T) int: rope positions, default ``arange(T)`` (``cache.length + arange(T)``).
        cache: with a cache, the new tokens are appended to it and the absorbed path attends over it.
        doc_ids (B, T) int: tokens attend only to earlier tokens of the same id (packed documents);
        training path only. A model passes one ``DocumentMask`` to every layer so the mask is built once.
        """
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t, device=x.device)
        cos, sin = self.rotary(positions)  # (T, R/2) each

        q = self.wq(x) if self.config.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, t, self.num_heads, self.qk_head_dim)  # (B, T, H, N + R), rope not applied yet
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, L), (B, T, R)
        c_kv = self.kv_norm(c_kv)

        if cache is None:
            o = self._expanded(q, c_kv, k_pe, cos, sin, doc_ids)
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids: document masking is for training; the cached path serves one document per row")
            q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
            o = self._absorbed(q_nope, apply_rope(q_pe, cos, sin), c_kv, apply_rope(k_pe, cos, sin), cache, start)
        return self.wo(o.flatten(2))  # (B, T, D)

    def _expanded(self, q, c_kv, k_pe, cos, sin, doc_ids) -> torch.Tensor:
        """Training / prefill path: q (B, T, H, N + R) un-roped, k_pe (B, T, R) un-roped. Returns (B, T, H, V)."""
        b, t, h, _ = q.shape
        kv = self.wkv_b(c_kv).view(b, t, h, self.nope_dim + self.v_head_dim)  # (B, T, H, N + V)
        q, k, v = _glue_for(q.device)(q, kv, k_pe, cos, sin, self.nope_dim)
        o = causal_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale, doc_ids,
            self.config.attention_backend,
        )  # (B, H, T, V)
        return o.transpose(1, 2)  # (B, T, H, V)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, cache: MLAKVCache, start: int) -> torch.Tensor:
        """Inference path over the latent cache. Returns (B, T, H, V)."""
        w = self.wkv_b.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, N, L), (H, V, L)
        q_lat = torch.einsum("bthn,hnl->bthl", q_nope, w_uk)  # (B, T, H, L)
        cache.append(c_kv.detach(), k_pe.detach())
        q_cat = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).to(cache.kv.dtype)  # (B, T, H, L + R)
        backend = resolve_decode_backend(
            self.config.decode_backend, q_cat.device, self.kv_lora_rank, self.rope_dim, cache.kv.dtype
        )
        o_lat = mla_decode(q_cat, cache, start, self.softmax_scale, backend)  # (B, T, H, L)
        return torch.einsum("bthl,hvl->bthv", o_lat.to(w_uv.dtype), w_uv)  # (B, T, H, V)
