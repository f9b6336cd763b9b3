import collections
import math

from llm.data.embedded import VALIDATION_DOCUMENTS, embedded_document, embedded_documents, number_word
from llm.data.tokenizer import embedded_tokenizer


def test_documents_are_deterministic_and_split_dependent():
    assert embedded_document(0, "train", 5) == embedded_document(0, "train", 5)
    train = set(embedded_documents(0, "train", stop=200))
    val = set(embedded_documents(0, "validation", stop=200))
    assert len(train) == 200 and not train & val
    assert embedded_document(1, "train", 5) != embedded_document(0, "train", 5)
    assert list(embedded_documents(0, "train", start=3, step=4, stop=12)) == [embedded_document(0, "train", i) for i in (3, 7, 11)]
    assert VALIDATION_DOCUMENTS > 0


def test_arithmetic_facts_are_true():
    assert number_word(42) == "forty two" and number_word(13) == "thirteen" and number_word(90) == "ninety"
    words = {number_word(i): i for i in range(100)}
    checked = 0
    for doc in embedded_documents(0, "train", stop=100):
        for sentence in doc.split(" ."):
            for op in (" plus ", " minus "):
                if op in sentence and " is " in sentence:
                    left, result = sentence.strip().split(" is ")
                    a, b = left.split(op)
                    want = words[a] + words[b] if op == " plus " else words[a] - words[b]
                    assert words[result] == want, sentence
                    checked += 1
    assert checked > 20


def test_learnable_bigram_entropy_well_below_unigram():
    """Structure a model can learn: H(next | previous token) is far below H(token)."""
    tok = embedded_tokenizer()
    ids = [t for d in embedded_documents(0, "train", stop=400) for t in tok.encode(d) + [tok.eos_id]]
    uni = collections.Counter(ids)
    n = len(ids)
    h1 = -sum(c / n * math.log2(c / n) for c in uni.values())
    pairs = collections.Counter(zip(ids, ids[1:], strict=False))
    h2 = -sum(c / (n - 1) * math.log2(c / uni[a]) for (a, _), c in pairs.items())
    assert h1 > 6.0  # a real vocabulary is in use
    assert h1 - h2 > 2.5, (h1, h2)
