"""``attnserve bench runtime``: ONNX Runtime against PyTorch eager on the same weights and inputs.

Encode at batch 1 and 32 (128 tokens), and one decode step at batch 1 and 16 with 128 cached
tokens, for the fp32 graphs and (where exported) the int8 ones. Prints a table and, with
``--json``, writes the figures. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.timing import machine
from export.timing import median_seconds
from service.runtime import Runtime, RuntimeOptions

SEQ = 128
CACHED = 128


def _ort_cases(rt: Runtime, seq: int, cached: int) -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {}
    for b in (1, 32):
        ids = np.ones((b, seq), np.int64)
        cases[f"encode b={b} t={seq}"] = functools.partial(rt.encode, ids, np.ones_like(ids))
    for b in (1, 16):
        cache = rt.new_cache(b)
        one = np.ones((b, 1), np.int64)

        def step(cache: Any = cache, one: np.ndarray = one) -> None:
            cache.lengths[:] = cached  # every timed step is the step after `cached` tokens
            rt.decode_step(cache, one, one)

        cases[f"decode step b={b} cached={cached}"] = step
    return cases


def _torch_cases(checkpoint: Path, seq: int, cached: int) -> dict[str, Callable[[], object]]:
    import torch

    from model.train import load_checkpoint
    from model.transformer import extend_cache

    torch.set_num_threads(os.cpu_count() or 1)
    model, cfg, _ = load_checkpoint(checkpoint / "checkpoint.pt")
    cases: dict[str, Callable[[], object]] = {}
    for b in (1, 32):
        ids = torch.ones(b, seq, dtype=torch.long)
        mask = torch.ones_like(ids)
        cases[f"encode b={b} t={seq}"] = functools.partial(torch.no_grad()(model), ids, mask)
    for b in (1, 16):
        past = [(torch.randn(b, cfg.model.n_head, cached, cfg.model.head_dim),) * 2 for _ in range(cfg.model.n_layer)]
        one = torch.ones(b, 1, dtype=torch.long)
        mask = torch.ones(b, cached + 1, dtype=torch.long)

        @torch.no_grad()
        def step(one: torch.Tensor = one, mask: torch.Tensor = mask, past: Any = past) -> object:
            # a step includes appending its keys and values to the cache, as a PyTorch server's would
            return extend_cache(past, model(one, mask, past=past).new_kv)

        cases[f"decode step b={b} cached={cached}"] = step
    return cases


def run(model_dir: Path, checkpoint: Path | None, seconds: float = 1.0) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    max_len = config["limits"]["max_seq_len"]
    seq, cached = min(SEQ, max_len), min(CACHED, max_len - 1)
    rows: dict[str, dict[str, float]] = {}
    for variant in ("fp32", "int8"):
        if variant != "fp32" and f"decoder_{variant}" not in config["graphs"]:
            continue
        rt = Runtime(model_dir, RuntimeOptions(device="cpu", variant=variant))  # type: ignore[arg-type]
        for name, fn in _ort_cases(rt, seq, cached).items():
            rows.setdefault(name, {})[f"onnxruntime {variant}"] = (
                median_seconds(fn, runs=10, min_seconds=seconds, warmup=3) * 1e3
            )
    checkpoint = checkpoint or Path(config["training"].get("checkpoint_dir", ""))
    if checkpoint and (checkpoint / "checkpoint.pt").is_file():
        for name, fn in _torch_cases(checkpoint, seq, cached).items():
            rows[name]["pytorch eager"] = median_seconds(fn, runs=10, min_seconds=seconds, warmup=3) * 1e3
    return {
        "model": f"{config['name']} {config['version']}",
        "machine": machine(),
        "unit": "ms (median)",
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    cols = sorted({c for r in result["rows"].values() for c in r})
    head = f"{'case':<28}" + "".join(f"{c:>20}" for c in cols)
    if "pytorch eager" in cols:
        head += f"{'eager / ort fp32':>18}"
    lines = [f"{result['model']} on {result['machine']}, {result['unit']}", head]
    for name, r in result["rows"].items():
        line = f"{name:<28}" + "".join(f"{r[c]:>20.3f}" if c in r else f"{'-':>20}" for c in cols)
        if "pytorch eager" in r:
            line += f"{r['pytorch eager'] / r['onnxruntime fp32']:>17.1f}x"
        lines.append(line)
    return "\n".join(lines)
