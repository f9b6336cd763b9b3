"""Packing documents into fixed-length training sequences, with document ids for attention masking.

Layout: documents are concatenated as ``[BOS] tokens EOS [BOS] tokens EOS ...`` (BOS only with
``add_bos``). A sequence is a window of S + 1 consecutive tokens: ``input_ids = window[:-1]``,
``labels = window[1:]``. Consecutive windows overlap by exactly one token, so every token of the
stream is a label exactly once and none is dropped.

Remainder policy: in training the stream never ends (it restarts a new epoch), so tokens left over
after a batch stay in the buffer for the next one and are saved in ``state_dict``; nothing is cut at
document or epoch boundaries. A finite stream (validation) ends with one partial window padded with
``pad_id``; padded positions have label ``IGNORE_INDEX`` and a doc id of their own.

``doc_ids`` number documents from 0 within each row (the document that the row starts in is 0), so
values are small and only equality matters: a token may attend to earlier tokens with the same id.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of padded positions (torch cross_entropy's default ignore_index)


class Packer:
    """A token buffer: documents go in, (n, S + 1) windows come out. Shapes: S = seq_len."""

    def __init__(self, seq_len: int, eos_id: int, bos_id: int, pad_id: int, add_bos: bool, num_sources: int):
        self.seq_len, self.eos_id, self.bos_id, self.pad_id, self.add_bos = seq_len, eos_id, bos_id, pad_id, add_bos
        self.tokens: list[int] = []
        self.docs: list[int] = []  # running document number of each buffered token
        self.next_doc = 0
        self.source_tokens = [0] * num_sources  # tokens (with EOS/BOS) delivered per source, for the mix report

    def add(self, ids: list[int], source: int) -> None:
        doc = ([self.bos_id] if self.add_bos else []) + list(ids) + [self.eos_id]
        self.tokens.extend(doc)
        self.docs.extend([self.next_doc] * len(doc))
        self.next_doc += 1
        self.source_tokens[source] += len(doc)

    def available(self) -> int:
        """Complete windows that can be taken now."""
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def take(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` windows as a batch: input_ids, labels, doc_ids, each (n, S) int64."""
        assert n <= self.available(), (n, self.available())
        end = n * self.seq_len + 1
        tokens = torch.tensor(self.tokens[:end], dtype=torch.int64)
        docs = torch.tensor(self.docs[:end], dtype=torch.int64)
        # Keep the last token: it is the first input of the next window (the one-token overlap).
        del self.tokens[: end - 1]
        del self.docs[: end - 1]
        return _windows(tokens, docs, n, self.seq_len)

    def take_padded(self, n: int) -> dict[str, torch.Tensor] | None:
        """At the end of a finite stream: what is left, padded up to ``n`` full windows (None if empty)."""
        if len(self.tokens) <= 1:
            return None
        need = n * self.seq_len + 1
        real = len(self.tokens)
        tokens = torch.full((need,), self.pad_id, dtype=torch.int64)
        tokens[:real] = torch.tensor(self.tokens, dtype=torch.int64)
        docs = torch.full((need,), self.next_doc, dtype=torch.int64)
        docs[:real] = torch.tensor(self.docs, dtype=torch.int64)
        batch = _windows(tokens, docs, n, self.seq_len)
        labels = batch["labels"].view(-1)
        labels[real - 1 :] = IGNORE_INDEX  # label j is token j + 1: the first pad is token `real`
        self.tokens, self.docs = [], []
        return batch

    def state_dict(self) -> dict:
        # int32 tensors: compact, and loadable with torch.load(weights_only=True).
        return {
            "tokens": torch.tensor(self.tokens, dtype=torch.int32),
            "docs": torch.tensor(self.docs, dtype=torch.int64),
            "next_doc": self.next_doc,
            "source_tokens": list(self.source_tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens = state["tokens"].tolist()
        self.docs = state["docs"].tolist()
        self.next_doc = int(state["next_doc"])
        if len(state["source_tokens"]) != len(self.source_tokens):
            raise ValueError(
                f"data state has {len(state['source_tokens'])} sources but the mix has {len(self.source_tokens)}; "
                "resume with the same dataset_config"
            )
        self.source_tokens = list(state["source_tokens"])


def _windows(tokens: torch.Tensor, docs: torch.Tensor, n: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Cut flat ``tokens``/``docs`` of length n*S + 1 into overlapping (n, S + 1) windows."""
    idx = torch.arange(n).unsqueeze(1) * seq_len + torch.arange(seq_len + 1)  # (n, S + 1)
    win, doc = tokens[idx], docs[idx]
    doc = doc - doc[:, :1]  # per-row numbering from 0
    # clone, not contiguous(): with n == 1 the slices are already "contiguous" views of one storage, and
    # take_padded's in-place IGNORE_INDEX on the labels would then overwrite the inputs too.
    return {"input_ids": win[:, :-1].clone(), "labels": win[:, 1:].clone(), "doc_ids": doc[:, :-1].clone()}
