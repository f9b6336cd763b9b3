import random

import torch

from llm.data.packing import IGNORE_INDEX, Packer


def _stream(docs, add_bos):
    out = []
    for d in docs:
        out += ([1] if add_bos else []) + d + [0]
    return out


def test_no_token_lost_and_doc_ids():
    rng = random.Random(0)
    docs = [[rng.randint(3, 99) for _ in range(rng.randint(1, 40))] for _ in range(50)]
    for add_bos in (False, True):
        p = Packer(seq_len=8, eos_id=0, bos_id=1, pad_id=2, add_bos=add_bos, num_sources=2)
        batches = []
        for i, d in enumerate(docs):
            p.add(d, i % 2)
            while p.available() >= 3:
                batches.append(p.take(3))
        batches.append(p.take_padded(3))
        flat = _stream(docs, add_bos)
        inputs = torch.cat([b["input_ids"] for b in batches]).view(-1)
        labels = torch.cat([b["labels"] for b in batches]).view(-1)
        kept = labels != IGNORE_INDEX
        # Every token after the first is a label exactly once, in order; inputs are the labels shifted.
        assert labels[kept].tolist() == flat[1:]
        assert inputs[: len(flat) - 1].tolist() == flat[:-1]
        assert sum(p.source_tokens) == len(flat)
        for b in batches:
            assert b["input_ids"].shape == b["labels"].shape == b["doc_ids"].shape == (3, 8)
            assert b["input_ids"].dtype == torch.int64 and (b["doc_ids"][:, 0] == 0).all()
            # The document id rises right after each EOS input and nowhere else.
            steps = b["doc_ids"][:, 1:] - b["doc_ids"][:, :-1]
            after_eos = b["input_ids"][:, :-1] == 0
            assert (steps[after_eos] == 1).all() and (steps[~after_eos] == 0).all()


def test_state_round_trip_through_torch_save(tmp_path):
    p = Packer(seq_len=4, eos_id=0, bos_id=1, pad_id=2, add_bos=False, num_sources=1)
    p.add(list(range(3, 20)), 0)
    p.take(2)
    torch.save(p.state_dict(), tmp_path / "s.pt")
    q = Packer(seq_len=4, eos_id=0, bos_id=1, pad_id=2, add_bos=False, num_sources=1)
    q.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    p.add([5, 6, 7], 0)
    q.add([5, 6, 7], 0)
    a, b = p.take(2), q.take(2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_padded_single_window_keeps_inputs_valid():
    """Batch size 1: the padded labels must not alias the inputs (they are -100 only in labels)."""
    from llm.data.packing import IGNORE_INDEX, Packer

    packer = Packer(seq_len=8, eos_id=0, bos_id=1, pad_id=2, add_bos=False, num_sources=1)
    packer.add([5, 6, 7], 0)
    batch = packer.take_padded(1)
    assert batch["input_ids"].min() >= 0
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 2, 2, 2, 2]]
    assert batch["labels"].tolist() == [[6, 7, 0] + [IGNORE_INDEX] * 5]
