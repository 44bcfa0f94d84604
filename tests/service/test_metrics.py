"""The buffered histogram: the series a prometheus Histogram gives, whatever the folding."""

from __future__ import annotations

import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, BufferedHistogram


def exposition(registry: CollectorRegistry) -> dict[str, float]:
    """Sample name and labels -> value, without the _created series (a Histogram's own)."""
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("#") or "_created" in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, BATCH_BUCKETS])
def test_it_exposes_what_a_histogram_exposes(buckets: tuple[float, ...]) -> None:
    rng = random.Random(7)
    values = [*buckets, 0.0, -1.0, buckets[-1] * 10, *(rng.random() * buckets[-1] * 1.2 for _ in range(5000))]
    values += [float(rng.randint(1, 200)) for _ in range(500)]
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    real = Histogram("x", "doc", buckets=buckets, registry=r1)
    ours = BufferedHistogram("x", "doc", buckets, r2)
    for v in values:  # values equal to a bound count in that bound's bucket ("le")
        real.observe(v)
        ours.observe(v)
    want, got = exposition(r1), exposition(r2)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12), name  # the sum may differ in its last digits
    assert generate_latest(r1).decode().count("# HELP x doc") == generate_latest(r2).decode().count("# HELP x doc")


def test_a_scrape_sees_every_value_observed_before_it_and_pending_values_stay_bounded() -> None:
    r = CollectorRegistry()
    h = BufferedHistogram("y_seconds", "doc", LATENCY_BUCKETS, r)
    h.observe(0.002)
    assert r.get_sample_value("y_seconds_count") == 1
    assert r.get_sample_value("y_seconds_bucket", {"le": "0.0025"}) == 1
    assert r.get_sample_value("y_seconds_bucket", {"le": "0.001"}) == 0
    for _ in range(3 * h.FOLD + 5):
        h.observe(0.5)
        assert len(h._pending) < h.FOLD
    assert r.get_sample_value("y_seconds_count") == 3 * h.FOLD + 6
    assert r.get_sample_value("y_seconds_sum") == pytest.approx(0.002 + 0.5 * (3 * h.FOLD + 5))


def test_no_value_is_lost_when_scrapes_fold_beside_the_observing_thread() -> None:
    r = CollectorRegistry()
    h = BufferedHistogram("z", "doc", BATCH_BUCKETS, r)
    n = 5 * h.FOLD + 123
    done = threading.Event()

    def observe() -> None:
        for i in range(n):
            h.observe(float(i % 40))
        done.set()

    t = threading.Thread(target=observe)
    t.start()
    scrapes = 0
    while not done.is_set() or scrapes < 3:
        generate_latest(r)  # folds whatever is pending, beside the thread's own folds
        scrapes += 1
    t.join()
    assert r.get_sample_value("z_count") == n
    assert r.get_sample_value("z_bucket", {"le": "1.0"}) == sum(1 for i in range(n) if i % 40 <= 1)
    assert r.get_sample_value("z_sum") == sum(float(i % 40) for i in range(n))
