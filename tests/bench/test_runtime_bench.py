"""The runtime benchmark runs end to end and reports every case for every engine."""

from __future__ import annotations

from pathlib import Path

from bench.runtime import run, table


def test_bench_runtime_reports_every_case(model_dir: Path, tiny_checkpoint: Path) -> None:
    result = run(model_dir, tiny_checkpoint, seconds=0.01)
    assert set(result["rows"]) == {
        "encode b=1 t=64",
        "encode b=32 t=64",
        "decode step b=1 cached=63",
        "decode step b=16 cached=63",
    }
    for row in result["rows"].values():
        assert set(row) == {"onnxruntime fp32", "onnxruntime int8", "pytorch eager"}
        assert all(v > 0 for v in row.values())
    text = table(result)
    assert "eager / ort fp32" in text and "decode step b=1" in text
