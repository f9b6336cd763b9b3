"""The paged latent KV cache: layout, appends across blocks, limits, sizes."""

import pytest
import torch

from llm.models.kv_cache import BLOCK_SIZE, MLAKVCache, kv_bytes_per_token


def test_layout_is_flash_mla_paged():
    cache = MLAKVCache(batch_size=3, max_len=130, kv_lora_rank=12, rope_dim=4, dtype=torch.bfloat16)
    assert BLOCK_SIZE == 64
    assert cache.kv.shape == (3 * 3, 64, 1, 16)
    assert cache.block_table.dtype == torch.int32 and cache.block_table.shape == (3, 3)
    assert cache.capacity == 192 and cache.length == 0
    assert cache.bytes_per_token() == 16 * 2


def test_appends_land_in_the_right_pages_and_advance_length():
    cache = MLAKVCache(batch_size=2, max_len=150, kv_lora_rank=5, rope_dim=2)
    c1, p1 = torch.randn(2, 60, 5), torch.randn(2, 60, 2)
    c2, p2 = torch.randn(2, 10, 5), torch.randn(2, 10, 2)  # crosses the first page boundary
    cache.append(c1, p1)
    cache.append(c2, p2)
    assert cache.length == 70 and cache.cache_seqlens.tolist() == [70, 70]
    want = torch.cat([torch.cat([c1, p1], -1), torch.cat([c2, p2], -1)], 1)  # (B, 70, 7)
    assert torch.equal(cache.latent()[:, :70], want)
    # token 65 of sequence 1 sits at offset 1 of that sequence's second page
    page = cache.block_table[1, 1].item()
    assert torch.equal(cache.kv[page, 1, 0], want[1, 65])
    cache.reset()
    assert cache.length == 0 and cache.cache_seqlens.tolist() == [0, 0]


def test_overflow_and_batch_mismatch_raise():
    cache = MLAKVCache(batch_size=1, max_len=4, kv_lora_rank=3, rope_dim=2)
    cache.append(torch.randn(1, 3, 3), torch.randn(1, 3, 2))
    with pytest.raises(ValueError, match="exceed max_len=4"):
        cache.append(torch.randn(1, 2, 3), torch.randn(1, 2, 2))
    with pytest.raises(ValueError, match="holds 1"):
        cache.append(torch.randn(2, 1, 3), torch.randn(2, 1, 2))
    with pytest.raises(ValueError, match="max_len"):
        MLAKVCache(batch_size=1, max_len=0, kv_lora_rank=3, rope_dim=2)


def test_bytes_per_token_against_mha_and_gqa():
    # DeepSeek-V3 layer: 128 heads; MLA caches 512 + 64 values per token.
    assert kv_bytes_per_token("mla", 128, 128, kv_lora_rank=512, rope_dim=64) == 1152
    assert kv_bytes_per_token("mha", 128, 128) == 65536
    assert kv_bytes_per_token("gqa", 128, 128, kv_heads=8) == 4096
    with pytest.raises(ValueError, match="mha | gqa | mla"):
        kv_bytes_per_token("mqa", 1, 1)
