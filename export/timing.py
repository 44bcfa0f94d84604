"""Wall-time medians: the export report's speed figures, and the benchmarks' (stdlib only)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
