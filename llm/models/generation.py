"""Sampling text from a ``FoundationModel``: temperature, top-k, top-p, stop tokens, batches of prompts.

With ``use_cache`` the prompt is run once through the model, filling each block's latent KV cache
(``MultiHeadLatentAttention.make_cache``), and every further step feeds only the newest token.
Without it every step re-runs the whole sequence; the two give the same greedy tokens (tested).

A latent cache holds one length for the whole batch, so prompts are grouped by length and each
group is decoded as one batch: no padding, hence no padding mask and no position shift. Sequences
of a group that hit a stop token keep being fed (the batch steps together) but their output ends.

Shapes: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row.

    Args:
        logits: (B, V) next-token logits.
        temperature: 0 = greedy (argmax; top_k and top_p are then irrelevant); else logits / temperature.
        top_k: keep only the k most likely tokens (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all).
        generator: torch RNG for reproducible sampling (on the logits' device).
    Returns:
        (B,) int64 token ids.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest is 0 before dividing: a tiny temperature then gives -inf (and one 0), a
    # one-hot distribution, instead of inf - inf = NaN.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature: got {temperature}; must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k: got {top_k}; must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: got {top_p}; must be in (0, 1] (1.0 = off)")


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` sampled tokens.

    Args:
        model: a ``FoundationModel``; it runs in eval mode here and gets its mode back after.
        prompt_ids: (B, T) int tensor, or B lists of token ids (lengths may differ; none empty).
        max_new_tokens: tokens to sample per prompt; prompt length + this - 1 (the last token sampled is
            never fed back) must fit ``max_seq_len``.
        temperature, top_k, top_p: as in ``sample_next``.
        stop_ids: tokens that end a sequence; the stop token itself is not returned.
        use_cache: decode incrementally over the latent KV cache (else re-run the whole sequence).
        generator: torch RNG for reproducible sampling.
    Returns:
        B lists of new token ids, in prompt order.
    """
    check_sampling(temperature, top_k, top_p)
    if torch.is_tensor(prompt_ids) and prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids: a (B, T) tensor or B lists of token ids; got a tensor of shape {tuple(prompt_ids.shape)}")
    prompts = [list(map(int, p)) for p in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: got {max_new_tokens}; must be >= 0")
    cfg = model.config
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if len(p) + max_new_tokens - 1 > cfg.max_seq_len:  # the last new token is sampled, never fed back
            raise ValueError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens={max_new_tokens} - 1 exceed "
                f"model_config.max_seq_len={cfg.max_seq_len}"
            )
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} outside [0, vocab_size={cfg.vocab_size})")

    groups: dict[int, list[int]] = defaultdict(list)  # prompt length -> prompt indices
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for indices in groups.values():
            tokens = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=model.embed.weight.device)
            new = _generate_batch(model, tokens, max_new_tokens, temperature, top_k, top_p, stop_ids, use_cache, generator)
            for i, seq in zip(indices, new, strict=True):
                outputs[i] = seq
    finally:
        model.train(was_training)
    return outputs


def _generate_batch(
    model, tokens, max_new_tokens, temperature, top_k, top_p, stop_ids, use_cache, generator
) -> list[list[int]]:
    """Decode one batch of equal-length prompts, tokens (B, T)."""
    batch, prompt_len = tokens.shape
    outputs: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return outputs
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=tokens.device)
    # positions fed: the prompt and every new token but the last
    caches = model.make_caches(batch, prompt_len + max_new_tokens - 1) if use_cache else None
    logits = model(tokens, caches=caches)[:, -1]  # (B, V)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        done |= torch.isin(nxt, stop)
        for b, (tok, finished) in enumerate(zip(nxt.tolist(), done.tolist(), strict=True)):
            if not finished:
                outputs[b].append(tok)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = model(nxt[:, None], caches=caches)[:, -1]
        else:
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # (B, T + 1)
            logits = model(tokens)[:, -1]
    return outputs


def prompt_token_ids(tokenizer, prompts: Sequence[str], add_bos: bool) -> list[list[int]]:
    """Token ids of text prompts as training saw documents: BOS first when the data adds it. An empty
    prompt is the start of a new document: BOS when the data adds it, else EOS (what precedes a document
    in the packed stream)."""
    start = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return [start + tokenizer.encode(p) if p or start else [tokenizer.eos_id] for p in prompts]


def generate_text(
    checkpoint: str,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    use_cache: bool = True,
) -> list[str]:
    """``scripts/generate.py``: continue each text prompt with a checkpoint's model and tokenizer.

    ``checkpoint`` is a checkpoint folder or a run directory (its latest checkpoint). Generation
    stops at the tokenizer's EOS (documents are separated by EOS in training); an empty prompt
    starts from EOS, i.e. at the beginning of a new document.
    """
    from llm.data import build_tokenizer
    from llm.models.hf_export import model_from_checkpoint

    config, model = model_from_checkpoint(checkpoint, device=device)
    tokenizer = build_tokenizer(config.dataset_config)
    prompt_ids = prompt_token_ids(tokenizer, prompts, config.dataset_config.add_bos)
    generator = torch.Generator(device=device).manual_seed(seed)
    new = generate(
        model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_ids=[tokenizer.eos_id], use_cache=use_cache, generator=generator,
    )
    return [p + tokenizer.decode(ids) for p, ids in zip(prompts, new, strict=True)]
