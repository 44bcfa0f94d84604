"""The model directory's layout: what ``attnserve export`` writes and the runtime reads.

One module for both sides, so that a graph's name or the format's version is written once.
Plain constants and functions: importing it costs nothing and needs neither torch nor
ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1  # config.json's "format"; a server refuses a directory of another
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
REPORT = "export_report.json"

FILES = "files"  # config.json's record of every other file export wrote: {name: {"bytes": n, "sha256": hex}}
GRAPHS = ("encode", "decoder", "attention")  # every directory has these
OPTIONAL_GRAPHS = ("decoder_attn",)  # generation with attention; a directory without it serves the rest
STEP_GRAPH = "decoder_step"  # CPU one-token steps with the cache appended in place; the decoder does without it
KV_WRITE = "kv_write"  # the CUDA cache append
EXPORTED = (*GRAPHS, KV_WRITE, *OPTIONAL_GRAPHS, STEP_GRAPH)  # what export writes, in fp32
INT8_GRAPHS = ("encode", "decoder", STEP_GRAPH)  # the CPU variant: what CPU serving runs
FP16_GRAPHS = ("encode", "decoder", "attention")  # the CUDA variant
VARIANTS = ("fp32", "int8", "fp16")


def graph_file(graph: str) -> str:
    return f"{graph}.onnx"


def variant_key(graph: str, variant: str) -> str:
    """config.json's "graphs" key of a graph's variant ("decoder_int8"); fp32 graphs go by their own name."""
    return graph if variant == "fp32" or graph == KV_WRITE else f"{graph}_{variant}"


# where a model directory resolves to, and its files' names, sizes and modification times
DirState = tuple[str, tuple[tuple[str, int, int], ...]]


def state(model_dir: Path) -> DirState:
    """What the directory holds now, as cheaply as it can be told: the path it resolves to (a link
    swapped for another names a new one) and each file's name, size and modification time.
    OSError where it cannot be read."""
    real = model_dir.resolve(strict=True)
    files = []
    for entry in os.scandir(real):
        if entry.is_file():
            st = entry.stat()
            files.append((entry.name, st.st_size, st.st_mtime_ns))
    return str(real), tuple(sorted(files))


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Each file's size and SHA-256, for config.json's "files": every file but config.json itself
    and the export report, which the server does not read."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name not in (CONFIG, REPORT)
    }
