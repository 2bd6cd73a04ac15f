"""BPETokenizer: training on captions, fixed-length encoding, truncation, serialisation."""
import warnings

import pytest
import torch

from ldm.modules.tokenizer import BPETokenizer

CAPTIONS = [f"a {size} {color} {shape} on a {bg} background"
            for size in ("small", "large") for color in ("red", "green", "blue")
            for shape in ("circle", "square", "triangle") for bg in ("white", "black")]


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CAPTIONS, vocab_size=320)


def test_special_ids_padding_and_mask(tok):
    ids, mask = tok.encode(["a red circle", "a small blue square on a white background"], max_length=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all() and m[:n].all() and not m[n:].any()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_bpe_learned_merges_and_vocab_bound(tok):
    assert 259 <= tok.vocab_size <= 320
    # Frequent words are merged: far fewer tokens than bytes (byte-level would need 12 + spaces).
    _, mask = tok.encode(["a red circle"], max_length=32)
    assert int(mask.sum()) - 2 <= 4


@pytest.mark.parametrize("text", ["a red circle", "a large green triangle on a black background",
                                  "zoë's café: 3 purple hexagons!", "UPPER case"])
def test_round_trip(tok, text):
    ids, _ = tok.encode([text], max_length=64)
    assert tok.decode(ids[0]) == text.lower()  # byte-level: unseen words and unicode survive


def test_empty_prompt_is_bos_eos(tok):
    ids, mask = tok.encode([""], max_length=8)
    assert ids[0].tolist() == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 6
    assert mask[0].tolist() == [True, True] + [False] * 6


def test_truncation_one_warning_with_dropped_count(tok):
    long = ["a small red circle on a white background " * 3, "a large blue square on a black background " * 2]
    full_ids, full_mask = tok.encode(long, max_length=128)
    lengths = (full_mask.sum(1) - 2).tolist()  # tokens without BOS/EOS, measured untruncated
    max_length = 10
    expected_dropped = sum(n - (max_length - 2) for n in lengths)
    with pytest.warns(UserWarning) as record:
        ids, mask = tok.encode(long + ["a red circle"], max_length=max_length)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "2 caption(s)" in msg and f"dropping {expected_dropped} token(s)" in msg
    # The kept part is the untruncated prefix, and EOS still closes the sequence.
    assert torch.equal(ids[:2, :-1], full_ids[:, :max_length - 1])
    assert (ids[:2, -1] == tok.eos_id).all() and mask[:2].all()


def test_exact_fit_does_not_warn(tok):
    _, mask = tok.encode(["a small red circle on a white background"], max_length=64)
    n = int(mask.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = tok.encode(["a small red circle on a white background"], max_length=n)
    assert ids[0, -1] == tok.eos_id


def test_json_round_trip_and_deterministic_training(tok):
    again = BPETokenizer.from_json(tok.to_json())
    texts = ["a red circle", "", "something never seen"]
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(texts, 32), again.encode(texts, 32)))
    assert again.to_json() == tok.to_json()
    # Every rank fitting on the same captions must get the same tokenizer.
    assert BPETokenizer.train(CAPTIONS, vocab_size=320).to_json() == tok.to_json()


def test_bad_inputs(tok):
    with pytest.raises(TypeError, match="list\\[str\\]"):
        tok.encode("a red circle", 8)  # a bare string would otherwise be one caption per character
    with pytest.raises(ValueError, match="max_length"):
        tok.encode(["x"], 1)
    with pytest.raises(ValueError, match="vocab_size=100"):
        BPETokenizer.train(CAPTIONS, vocab_size=100)
    with pytest.raises(ValueError, match="format"):
        BPETokenizer.from_json('{"format": 99, "tokenizer": {}}')
