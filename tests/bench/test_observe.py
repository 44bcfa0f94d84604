"""The observability benchmark runs its four ways on one server and gives each one's figures."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from bench import observe


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_the_four_ways_run_on_one_server_and_each_is_measured(model_dir: Path) -> None:
    before = os.sched_getaffinity(0)
    r = observe.run(model_dir, rounds=4, calls=60, record_format="text")
    assert os.sched_getaffinity(0) == before  # the caller's cores, given back
    assert {mode: len(v) for mode, v in r["loop_us"].items()} == dict.fromkeys(observe.MODES, 4)
    assert all(us > 0 for v in r["loop_us"].values() for us in v)  # the event loop served every round
    assert all(us > 0 for us in r["writer_us"]["keys + access log"])  # and the writer wrote each record
    assert all(us > 0 for us in r["tracer_us"]["keys + traces"])  # and the tracer made each span
    assert all(math.isfinite(r["extra_loop_us"][m]) for m in observe.MODES[1:])
    assert "| keys + access log |" in observe.table(r) and "| keys + traces |" in observe.table(r)
