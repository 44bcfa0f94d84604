"""The attnserve command: subcommands, and no heavy import before one runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import synthetic_corpus


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, service.cli; print('torch' in sys.modules, 'model.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_train_from_the_command_line(tmp_path: Path) -> None:
    files = []
    for doc in synthetic_corpus(n_docs=6):
        f = tmp_path / f"{doc.name}.txt"
        f.write_text(doc.text, encoding="utf-8")
        files.append(str(f))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "train",
        "--config",
        "tiny",
        "--steps",
        "30",
        "--out",
        str(out),
        "--corpus",
        *files,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bits per byte" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["steps"] == 30 and metrics["corpus"]["train_documents"] + len(metrics["corpus"]["val_documents"]) == 6
    )


def test_unknown_subcommand_fails_with_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "service.cli", "fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
