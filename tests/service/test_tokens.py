"""Texts to token ids: always the tokenizer's own ids, whichever way they are found."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from service.tokens import ASCII_SPLIT, MAX_NEW_PIECES, MAX_PIECE_CHARS, TextTokenizer, splits_like_gpt2

TEXTS = [
    "the king speaks",
    "",
    "   ",
    "naïve café, déjà vu",
    "emoji 😀 and 中文 mixed",
    "line\nbreaks\tand tabs",
    "a" * 500,
    "don't, we'll; they're I'd've 12345 x2 $3.50!!  \n\n  end  ",
    "it's <|endoftext|> inside",
]

# the characters where GPT-2's split has its cases: contractions, spaces before words, numbers and
# punctuation, runs of white space before a word or at the end, and the separators \x1c-\x1f that
# Python's \s counts as white space and the tokenizer does not
TRICKY = "ab sStTrRevmld\n\t\r\x0b\x0c\x1c\x1f\x85 09.,!?'-_\x00\x7f<|>"


def tokenizer(model_dir: Path, special_as_text: bool) -> Tokenizer:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.encode_special_tokens = special_as_text
    return tok


def own(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


@pytest.mark.parametrize("special_as_text", [True, False])
def test_ids_are_the_tokenizers_own_one_text_or_many(model_dir: Path, special_as_text: bool) -> None:
    tok = tokenizer(model_dir, special_as_text)
    ids = TextTokenizer(tok)
    assert ids.fast
    want = own(tok, TEXTS)
    assert ids(TEXTS) == want
    assert [ids([t])[0] for t in TEXTS] == want
    assert ids(TEXTS) == want  # again, from the table of pieces
    assert ids([]) == []


def test_separator_typed_in_a_text_is_text_only_where_the_tokenizer_says_so(model_dir: Path) -> None:
    text = "a <|endoftext|> b"
    as_text, as_token = (TextTokenizer(tokenizer(model_dir, flag))([text])[0] for flag in (True, False))
    assert 0 in as_token and 0 not in as_text
    assert as_text == own(tokenizer(model_dir, True), [text])[0]


def byte_level_chars() -> dict[str, str]:
    """The byte-level alphabet's character for each ASCII byte, back to the byte's own (GPT-2's table:
    printable bytes stand for themselves, the others for 256 and up in byte order)."""
    printable = set(range(ord("!"), ord("~") + 1))
    others = [b for b in range(256) if b not in printable and not 0xA1 <= b <= 0xAC and not 0xAE <= b <= 0xFF]
    table = {chr(b): chr(b) for b in printable}
    table.update({chr(256 + n): chr(b) for n, b in enumerate(others) if b < 128})
    return table


def test_the_split_is_the_tokenizers_own(model_dir: Path) -> None:
    split = tokenizer(model_dir, True).pre_tokenizer
    back = byte_level_chars()
    rng = random.Random(1)
    ascii_only = TRICKY.replace("\x85", "")
    texts = ["".join(rng.choice(ascii_only) for _ in range(rng.randint(0, 16))) for _ in range(3000)]
    texts += [c + t for c in map(chr, range(128)) for t in (" x", "  y", "\t", "")]
    for text in texts:
        pieces = ["".join(back[c] for c in p) for p, _ in split.pre_tokenize_str(text)]
        assert ASCII_SPLIT.findall(text) == pieces, repr(text)


def test_random_ascii_texts_get_the_tokenizers_ids(model_dir: Path) -> None:
    tok = tokenizer(model_dir, True)
    ids = TextTokenizer(tok, max_pieces=64)  # a small table, so that it fills and starts afresh too
    rng = random.Random(0)
    alphabets = [TRICKY, "".join(map(chr, range(128)))]
    texts = ["".join(rng.choice(a) for _ in range(rng.randint(0, 24))) for a in alphabets for _ in range(4000)]
    assert ids(texts) == own(tok, texts)
    assert len(ids.pieces) <= 64


def test_every_ascii_character_in_every_context_gets_the_tokenizers_ids(model_dir: Path) -> None:
    tok = tokenizer(model_dir, True)
    contexts = ("{}", "a{}b", " {} ", "{}{}", "'{}s", "x {}  y", "1{}2", "{}   z", "q\n{}")
    texts = [c.replace("{}", chr(i)) for i in range(128) for c in contexts]
    assert TextTokenizer(tok)(texts) == own(tok, texts)


def test_long_pieces_are_not_kept(model_dir: Path) -> None:
    tok = tokenizer(model_dir, True)
    ids = TextTokenizer(tok)
    text = "word " + "9" * (MAX_PIECE_CHARS + 1) + " " * 100 + "end"
    for _ in range(3):
        assert ids([text]) == own(tok, [text])
    assert all(len(p) <= MAX_PIECE_CHARS for p in ids.pieces) and " word" not in ids.pieces and "word" in ids.pieces


def test_a_text_of_many_new_pieces_goes_to_the_tokenizer_whole_having_added_a_few(model_dir: Path) -> None:
    tok = tokenizer(model_dir, True)
    ids = TextTokenizer(tok)
    text = "alpha beta gamma delta epsilon zeta"  # six pieces
    want = own(tok, [text])
    for n in range(1, 5):
        assert ids([text]) == want
        assert len(ids.pieces) == min(6, n * MAX_NEW_PIECES)
    assert set(ids.pieces) == {"alpha", " beta", " gamma", " delta", " epsilon", " zeta"}


def test_a_tokenizer_split_otherwise_is_asked_for_every_text(model_dir: Path) -> None:
    tok = tokenizer(model_dir, True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    assert not splits_like_gpt2(tok)
    ids = TextTokenizer(tok)
    assert not ids.fast
    assert ids(TEXTS) == own(tok, TEXTS)
    assert ids.pieces == {}
