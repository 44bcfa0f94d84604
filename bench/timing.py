"""Timing helpers shared by the benchmarks and the export report."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def median_seconds(fn: Callable[[], object], runs: int = 10, min_seconds: float = 0.0, warmup: int = 1) -> float:
    """Median wall time of fn over at least ``runs`` calls and ``min_seconds``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def start_server(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    """``attnserve serve`` on a free loopback port, in its own process; returns once it says it serves.

    Its stderr stays open for the caller (the rest of the log)."""
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "--log-level",
        "INFO",
        "serve",
        "--model-dir",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "-1",
        "--device",
        "cpu",
        *flags,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        if m := re.search(r"gRPC on \S+:(\d+)", line):
            port = int(m.group(1))
        if "serving " in line:
            return proc, port
    proc.wait(10)
    raise RuntimeError(f"the server did not start (exit {proc.returncode})")


@contextmanager
def server_process(model_dir: Path, *flags: str) -> Iterator[str]:
    """A server for the length of a with-block; yields its address and stops it with SIGTERM."""
    proc, port = start_server(model_dir, *flags)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
