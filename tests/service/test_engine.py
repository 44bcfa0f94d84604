"""The engine's tokenizing: the ids the tokenizer's own encode gives, whatever the batch."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from service.engine import token_ids

TEXTS = [
    "the king speaks",
    "",
    "   ",
    "naïve café, déjà vu",
    "emoji 😀 and 中文 mixed",
    "line\nbreaks\tand tabs",
    "a" * 500,
]


def test_token_ids_are_the_tokenizers_own_one_text_or_many(model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    want = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
    assert token_ids(tok, TEXTS) == want
    assert [token_ids(tok, [t])[0] for t in TEXTS] == want
    assert token_ids(tok, []) == []
