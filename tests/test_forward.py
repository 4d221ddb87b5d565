"""forward.py: truncation (which tokens of a long text are kept)."""

import pytest

from lightune import forward
from lightune.config import TRUNCATIONS


def _long_text(n: int) -> str:
    """n distinct number tokens (the tiny vocabulary has 0..999), so each kept position is identifiable."""
    return " ".join(str(i) for i in range(n))


@pytest.mark.parametrize("max_length", [8, 16, 33])
def test_head_tail_keeps_the_first_and_last_tokens_within_the_limit(tiny_model_dir, max_length):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = _long_text(100)
    full = tok([text])["input_ids"][0]  # [CLS] 0 1 ... 99 [SEP]
    cls, content, sep = full[0], full[1:-1], full[-1]
    budget = max_length - 2
    head = int(budget * forward.HEAD_SHARE)
    ids = forward.encode_texts(tok, [text], max_length, "head_tail")["input_ids"][0]
    assert len(ids) == max_length
    assert ids == [cls] + content[:head] + content[len(content) - (budget - head):] + [sep]
    tail = forward.encode_texts(tok, [text], max_length, "tail")
    assert tail["input_ids"][0] == [cls] + content[-budget:] + [sep]
    assert set(tail) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(len(v[0]) == max_length for v in tail.values())
    head_ids = forward.encode_texts(tok, [text], max_length, "head")["input_ids"][0]
    assert head_ids == [cls] + content[:budget] + [sep]


def test_short_texts_are_the_same_under_every_truncation(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["good film", _long_text(14)]
    encoded = [forward.encode_texts(tok, texts, 16, t) for t in TRUNCATIONS]
    assert encoded[0] == encoded[1] == encoded[2] == dict(tok(texts))
