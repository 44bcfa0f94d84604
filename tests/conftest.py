"""Shared fixtures: a small synthetic corpus that a tiny model learns in seconds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from service.runtime import cuda_usable

    if not cuda_usable():
        skip = pytest.mark.skip(reason="no usable CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(corpus: list[Document], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained briefly: enough structure for exports to be checked against."""
    from model.config import preset
    from model.train import train

    out = tmp_path_factory.mktemp("tiny_checkpoint")
    train(preset("tiny"), out, corpus, steps=150, progress=False)
    return out


@pytest.fixture(scope="session")
def model_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported with every variant."""
    from export.onnx_export import export_model

    out = tmp_path_factory.mktemp("exported") / "tiny"
    export_model(tiny_checkpoint, out, int8=True, fp16=True, name="tiny")
    return out


@pytest.fixture(scope="session")
def export_report(model_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((model_dir / "export_report.json").read_text())
