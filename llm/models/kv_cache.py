"""The latent KV cache of one MLA layer: preallocated, paged in blocks of 64 tokens (FlashMLA's layout).

Per token it holds only ``[c_kv | k_pe]``: the RMS-normalised latent (kv_lora_rank = L values) and the
roped shared rope key (qk_rope_head_dim = R values), L + R values in all (576 for DeepSeek-V3, 1,152 B in
bf16), against ``2 * H * head_dim`` for multi-head attention.

Storage is ``kv (num_blocks, 64, 1, L + R)`` with ``block_table (B, blocks_per_seq)`` int32; the middle 1
is FlashMLA's kv-head axis. Blocks are allocated contiguously per sequence, so ``latent()`` is a free view
of sequence b's tokens; the block table exists for paged kernels (FlashMLA, the Triton decode kernel).
``append()`` and ``latent()`` assume that contiguous layout: a caller must not remap blocks. All sequences
of a batch share one length (prefill pads, then decode steps together).
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 64  # tokens per page; FlashMLA requires 64


class MLAKVCache:
    """Preallocated latent cache for ``batch_size`` sequences of up to ``max_len`` tokens.

    Attributes:
        kv: (num_blocks, BLOCK_SIZE, 1, L + R) storage, ``[c_kv | k_pe]`` per token.
        block_table: (B, blocks_per_seq) int32 block ids of each sequence, in order.
        length: tokens already written (the same for every sequence), a Python int.
        cache_seqlens: (B,) int32 copy of ``length`` on the device, for kernels.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
        if max_len < 1:
            raise ValueError(f"max_len: got {max_len}; must be >= 1")
        self.batch_size = batch_size
        self.max_len = max_len
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.blocks_per_seq = -(-max_len // BLOCK_SIZE)
        num_blocks = batch_size * self.blocks_per_seq
        self.kv = torch.zeros(num_blocks, BLOCK_SIZE, 1, kv_lora_rank + rope_dim, device=device, dtype=dtype)
        self.block_table = torch.arange(num_blocks, device=device, dtype=torch.int32).view(
            batch_size, self.blocks_per_seq
        )
        self.cache_seqlens = torch.zeros(batch_size, device=device, dtype=torch.int32)
        self.length = 0

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold (max_len rounded up to whole blocks)."""
        return self.blocks_per_seq * BLOCK_SIZE

    def latent(self) -> torch.Tensor:
        """(B, capacity, L + R) view of every sequence's slots (only the first ``length`` are written)."""
        return self.kv.view(self.batch_size, self.capacity, self.kv_lora_rank + self.rope_dim)

    def append(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Write the new tokens at ``length`` and advance it.

        c_kv (B, T, L) normalised latent; k_pe (B, T, R) roped rope key.
        """
        b, t, _ = c_kv.shape
        if b != self.batch_size:
            raise ValueError(f"cache batch: got {b} sequences; the cache holds {self.batch_size}")
        if self.length + t > self.max_len:
            raise ValueError(f"cache overflow: {self.length} + {t} new tokens exceed max_len={self.max_len}")
        slots = self.latent()[:, self.length : self.length + t]  # (B, T, L + R) view into kv
        slots[..., : self.kv_lora_rank].copy_(c_kv)
        slots[..., self.kv_lora_rank :].copy_(k_pe)
        self.length += t
        self.cache_seqlens.fill_(self.length)

    def reset(self) -> None:
        """Forget every token (storage is kept, not cleared)."""
        self.length = 0
        self.cache_seqlens.zero_()

    def bytes_per_token(self) -> int:
        """Cache bytes per token per layer."""
        return (self.kv_lora_rank + self.rope_dim) * self.kv.element_size()


def kv_bytes_per_token(
    kind: str, num_heads: int, head_dim: int, kv_heads: int = 1, kv_lora_rank: int = 0, rope_dim: int = 0, elem: int = 2
) -> int:
    """Cache bytes per token per layer: ``mha`` (K and V of every head), ``gqa`` (K and V of kv_heads
    groups), ``mla`` (the latent plus the shared rope key)."""
    if kind == "mha":
        return 2 * num_heads * head_dim * elem
    if kind == "gqa":
        return 2 * kv_heads * head_dim * elem
    if kind == "mla":
        return (kv_lora_rank + rope_dim) * elem
    raise ValueError(f"kind: got {kind!r}; allowed: mha | gqa | mla")
