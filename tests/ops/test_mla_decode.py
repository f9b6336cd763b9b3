"""Absorbed MLA decode: the Triton kernel against the torch reference, and the backend switch.

CI runs the kernel through the Triton interpreter on CPU tensors (fp32 dots, exact to 1e-5); on a GPU
(TRITON_INTERPRET=0) it runs compiled, where fp32 dots use TF32 and the bound is a relative RMS error.
"""

import os

import pytest
import torch

from llm.models.kv_cache import MLAKVCache
from llm.ops.mla_decode import mla_decode, mla_decode_reference, resolve_decode_backend
from llm.ops.triton_mla_decode import mla_decode_triton

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def rel_rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def assert_close_to_reference(out, ref):
    if DEVICE == "cpu":
        err = (out - ref).abs().max().item()
        assert err < 1e-5, f"max abs err {err}, rel rms {rel_rms(out, ref)}"
    else:
        assert rel_rms(out, ref) < 5e-3


CASES = [
    # B, H, L, R, cached before, new tokens, splits
    pytest.param(2, 3, 24, 10, 70, 1, None, id="odd-widths-one-token"),
    pytest.param(1, 16, 32, 16, 100, 1, 3, id="16-heads-3-splits"),
    pytest.param(2, 5, 16, 16, 61, 4, 2, id="4-new-tokens-crossing-a-page"),
    pytest.param(1, 2, 20, 6, 0, 7, None, id="prefill-from-empty"),
]


@pytest.mark.parametrize("b,h,lora,rope,start,tq,splits", CASES)
def test_triton_matches_reference(b, h, lora, rope, start, tq, splits):
    torch.manual_seed(0)
    cache = MLAKVCache(b, 140, lora, rope, device=DEVICE)
    cache.append(torch.randn(b, start + tq, lora).to(DEVICE), torch.randn(b, start + tq, rope).to(DEVICE))
    q = torch.randn(b, tq, h, lora + rope).to(DEVICE)
    out = mla_decode_triton(q, cache.kv, cache.block_table, start, lora, scale=0.2, num_splits=splits)
    ref = mla_decode_reference(q, cache.latent(), start, lora, scale=0.2)
    assert out.shape == (b, tq, h, lora)
    assert_close_to_reference(out, ref)


def test_triton_follows_a_shuffled_block_table():
    torch.manual_seed(1)
    b, h, lora, rope, n = 2, 4, 16, 16, 150
    cache = MLAKVCache(b, n, lora, rope, device=DEVICE)
    cache.append(torch.randn(b, n, lora).to(DEVICE), torch.randn(b, n, rope).to(DEVICE))
    q = torch.randn(b, 1, h, lora + rope).to(DEVICE)
    ref = mla_decode_reference(q, cache.latent(), n - 1, lora, 0.3)
    # move the pages around and remap the table: the kernel must follow it
    perm = torch.randperm(cache.kv.shape[0]).to(DEVICE)
    kv = torch.empty_like(cache.kv)
    kv[perm] = cache.kv
    table = perm[cache.block_table.long()].to(torch.int32)
    out = mla_decode_triton(q, kv, table, n - 1, lora, 0.3, num_splits=2)
    assert_close_to_reference(out, ref)


def test_reference_is_causal_among_new_tokens():
    torch.manual_seed(2)
    latent = torch.randn(1, 6, 10)
    q = torch.randn(1, 3, 2, 10)
    out = mla_decode_reference(q, latent, 3, 8, 0.5)
    # the first new token (position 3) must equal a call that only has 4 tokens
    alone = mla_decode_reference(q[:, :1], latent[:, :4], 3, 8, 0.5)
    assert torch.allclose(out[:, :1], alone, atol=1e-6)


def test_dispatch_and_backend_errors():
    cpu = torch.device("cpu")
    assert resolve_decode_backend("auto", cpu) == "torch"
    if DEVICE == "cpu":
        assert resolve_decode_backend("triton", cpu) == "triton"  # TRITON_INTERPRET=1 under the tests
    with pytest.raises(ValueError, match="mla_config.decode_backend: got 'flash_mla'"):
        resolve_decode_backend("flash_mla", cpu)
    with pytest.raises(ValueError, match="allowed: auto"):
        resolve_decode_backend("cuda", cpu)
    cache = MLAKVCache(1, 8, 8, 4, device=DEVICE)
    cache.append(torch.randn(1, 5, 8).to(DEVICE), torch.randn(1, 5, 4).to(DEVICE))
    q = torch.randn(1, 1, 2, 12).to(DEVICE)
    a = mla_decode(q, cache, 4, 0.3, "torch")
    t = mla_decode(q, cache, 4, 0.3, "triton")
    assert_close_to_reference(t, a)
