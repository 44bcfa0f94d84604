"""The byte-level BPE tokenizer: exact round trips of any text, byte accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import Document
from model.tokenizer import EOT, Tokenizer


@pytest.fixture(scope="module")
def tok(corpus: list[Document]) -> Tokenizer:
    return Tokenizer.train((d.text for d in corpus), vocab_size=320)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_any_unicode_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200).filter(lambda t: EOT not in t))
def test_token_bytes_add_up_to_the_utf8_length(tok: Tokenizer, text: str) -> None:
    lengths = tok.token_byte_lengths()
    assert sum(int(lengths[i]) for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_the_separator_in_a_text_is_the_separator_and_counts_no_bytes(tok: Tokenizer) -> None:
    # hypothesis draws the module's string constants too, EOT among them: the property above holds for text
    # without it, and this is what text with it gives
    lengths = tok.token_byte_lengths()
    ids = tok.encode(f"ab{EOT}cd")
    assert tok.hf.token_to_id(EOT) in ids
    assert sum(int(lengths[i]) for i in ids) == len(b"abcd")


def test_learns_merges_from_the_corpus(tok: Tokenizer) -> None:
    line = "The king speaks of the crown."
    assert len(tok.encode(line)) < len(line.encode()) / 2  # merged well beyond single bytes


def test_save_and_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    text = "Good sir, ¿qué tal? 😀\n\ttabs"
    assert again.encode(text) == tok.encode(text)
    assert again.eot_id == tok.eot_id
    assert tok.decode([tok.eot_id]) == EOT
