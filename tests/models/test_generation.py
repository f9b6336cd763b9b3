"""Sampling (llm/models/generation.py): cache equivalence, batching, stop tokens, sampling filters."""

from __future__ import annotations

import pytest
import torch
from test_foundation import tiny_config  # tests/models is on sys.path (rootdir-relative imports)

from llm.models.foundation import FoundationModel
from llm.models.generation import generate, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = tiny_config(init_std=0.3)  # peaked logits: greedy choices far from ties
    cfg.mla_config.q_lora_rank = 6
    return FoundationModel(cfg)


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]


def test_greedy_with_cache_equals_without_cache(model):
    cached = model.generate(PROMPTS, 10, temperature=0.0, use_cache=True)
    uncached = model.generate(PROMPTS, 10, temperature=0.0, use_cache=False)
    assert cached == uncached
    assert [len(s) for s in cached] == [10] * 4


def test_batched_prompts_equal_one_at_a_time(model):
    batched = model.generate(PROMPTS, 6, temperature=0.0)
    single = [model.generate([p], 6, temperature=0.0)[0] for p in PROMPTS]
    assert batched == single
    tensor_prompts = model.generate(torch.tensor([[1, 2, 3], [6, 7, 8]]), 6, temperature=0.0)
    assert tensor_prompts == [batched[0], batched[2]]


def test_greedy_equals_argmax_of_the_full_forward(model):
    out = model.generate([[3, 1, 4]], 5, temperature=0.0)[0]
    seq = [3, 1, 4]
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_stop_token_ends_only_its_sequence(model):
    free = model.generate(PROMPTS, 8, temperature=0.0)
    stop = free[0][3]
    out = model.generate(PROMPTS, 8, temperature=0.0, stop_ids=[stop])
    for full, cut in zip(free, out, strict=True):
        expected = full[: full.index(stop)] if stop in full else full
        assert cut == expected
    assert out[0] == free[0][: free[0].index(stop)]


def test_seeded_sampling_is_reproducible_and_restores_mode(model):
    model.train()
    a = model.generate(PROMPTS, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(PROMPTS, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert model.training
    model.eval()


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0.0), torch.full((400,), 1))
    assert set(sample_next(logits, 1.0, top_k=1, generator=g).tolist()) == {1}
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    # probabilities ~[.03, .64, .24, .09, .01]: top_p=0.8 keeps {1, 2} (0.64 < 0.8 <= 0.88)
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {1}
    # high temperature flattens: every token appears
    assert set(sample_next(logits, 10.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    # a tiny positive temperature is greedy, not NaN (logits / 1e-40 overflowed before)
    assert set(sample_next(logits, 1e-40, generator=g).tolist()) == {1}
    # sampled frequencies follow the softmax
    freq = torch.bincount(sample_next(logits.repeat(10, 1), 1.0, generator=g), minlength=5).float() / 4000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.03, rtol=0)


def test_bad_arguments_raise(model):
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model.generate([[1] * 30], 4)
    # the last sampled token is never fed back: 30 + 3 new tokens run 32 positions, which fit
    assert len(model.generate([[1] * 30], 3, stop_ids=[])[0]) == 3
    assert len(generate(model, [[1] * 30], 3, use_cache=False)[0]) == 3
    with pytest.raises(ValueError, match=r"prompt_ids: .* shape \(3,\)"):
        model.generate(torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        model.generate([[]], 3)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate([[99]], 3)
    assert model.generate([[1]], 0) == [[]]


def test_prompt_token_ids_start_documents_as_training_did():
    from llm.data.tokenizer import embedded_tokenizer
    from llm.models.generation import prompt_token_ids

    tok = embedded_tokenizer()
    with_bos = prompt_token_ids(tok, ["", "a"], add_bos=True)
    without = prompt_token_ids(tok, ["", "a"], add_bos=False)
    if tok.bos_id is not None:
        assert with_bos[0] == [tok.bos_id] and with_bos[1][0] == tok.bos_id  # an empty prompt: a new document
    assert without[0] == [tok.eos_id] and without[1] == tok.encode("a")
