"""Shared fixtures: a small synthetic corpus that a tiny model learns in seconds."""

from __future__ import annotations

import random

import pytest

from model.data import Document

SUBJECTS = ["the king", "my lord", "the queen", "a fool", "the ghost", "sweet love", "good sir", "the night"]
VERBS = ["speaks of", "dreams of", "weeps for", "laughs at", "calls for", "hides from", "waits for", "sings of"]
OBJECTS = ["the crown", "his sword", "the moon", "a rose", "her grave", "the sea", "thy heart", "our fate"]


def synthetic_corpus(n_docs: int = 10, lines_per_doc: int = 120, seed: int = 0) -> list[Document]:
    """Documents of short verse-like lines from a small grammar: structured enough to learn fast."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = []
        for _ in range(lines_per_doc):
            s, v, o = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)
            lines.append(f"{s.capitalize()} {v} {o}{rng.choice(['.', '!', ',', ';'])}")
        docs.append(Document(f"doc{d:02d}", "\n".join(lines) + "\n"))
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[Document]:
    return synthetic_corpus()
