"""The buffered histogram: the series a prometheus Histogram gives, with or without labels, whatever the folding."""

from __future__ import annotations

import random
import socket
import threading
import time
from urllib.request import urlopen

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from service import metrics as metrics_module
from service.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, BufferedHistogram, Metrics, Tally


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


def test_labelled_series_expose_what_a_labelled_histogram_exposes() -> None:
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    real = Histogram("calls_seconds", "doc", ["rpc", "code"], buckets=LATENCY_BUCKETS, registry=r1)
    ours = BufferedHistogram("calls_seconds", "doc", LATENCY_BUCKETS, r2, ["rpc", "code"])
    assert exposition(r1) == exposition(r2) == {}  # no series until one is asked for
    real.labels("Encode", "OK")
    ours.labels("Encode", "OK")
    rng = random.Random(3)
    for _ in range(3000):
        rpc, code, v = rng.choice(["Encode", "Generate"]), rng.choice(["OK", "CANCELLED"]), rng.random() * 0.02
        real.labels(rpc, code).observe(v)
        ours.labels(rpc, code).observe(v)
    want, got = exposition(r1), exposition(r2)
    assert want.keys() == got.keys() and len(want) == 4 * (len(LATENCY_BUCKETS) + 3)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-12), name
    assert ours.labels("Encode", "OK") is ours.labels("Encode", "OK")
    with pytest.raises(ValueError):
        ours.labels("Encode")
    with pytest.raises(ValueError):
        ours.observe(1.0)  # a labelled histogram is observed through a series


def test_the_services_histograms_count_in_bulk_under_their_names() -> None:
    m = Metrics()
    m.request_seconds.labels("Encode").observe(0.003)
    m.queue_seconds.labels("encode", "low").observe(0.001)
    m.gen_e2e_seconds.observe(45.0)
    r = m.registry
    assert r.get_sample_value("attnserve_request_duration_seconds_count", {"rpc": "Encode"}) == 1
    assert (
        r.get_sample_value(
            "attnserve_queue_duration_seconds_bucket", {"graph": "encode", "priority": "low", "le": "0.001"}
        )
        == 1
    )
    assert r.get_sample_value("attnserve_generate_duration_seconds_bucket", {"le": "60.0"}) == 1
    assert r.get_sample_value("attnserve_generate_duration_seconds_bucket", {"le": "30.0"}) == 0


def test_a_scrape_sees_every_value_observed_before_it_and_pending_values_stay_bounded() -> None:
    r = CollectorRegistry()
    h = BufferedHistogram("y_seconds", "doc", LATENCY_BUCKETS, r)
    h.observe(0.002)
    assert r.get_sample_value("y_seconds_count") == 1
    assert r.get_sample_value("y_seconds_bucket", {"le": "0.0025"}) == 1
    assert r.get_sample_value("y_seconds_bucket", {"le": "0.001"}) == 0
    for _ in range(3 * Tally.FOLD + 5):
        h.observe(0.5)
        assert len(h.labels()._pending) < Tally.FOLD
    assert r.get_sample_value("y_seconds_count") == 3 * Tally.FOLD + 6
    assert r.get_sample_value("y_seconds_sum") == pytest.approx(0.002 + 0.5 * (3 * Tally.FOLD + 5))


def test_no_value_is_lost_when_scrapes_fold_beside_the_observing_thread() -> None:
    r = CollectorRegistry()
    h = BufferedHistogram("z", "doc", BATCH_BUCKETS, r)
    n = 5 * Tally.FOLD + 123
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


def test_the_scrape_port_closes_idle_connections_and_bounds_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that send half a request held a thread each, for ever, in the serving process."""
    monkeypatch.setattr(metrics_module, "SCRAPE_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_module.QuietHandler, "timeout", 0.5)
    server = Metrics().serve(0, "127.0.0.1")
    port = server.server_port
    threads = threading.active_count()
    idle = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
            idle.append(s)
        time.sleep(0.2)
        assert threading.active_count() <= threads + 4  # one a connection served, four at most
        for s in idle:  # each is closed: the ones over the bound at once, the rest once idle too long
            s.settimeout(5)
            assert s.recv(1) == b""
        deadline = time.monotonic() + 5
        while threading.active_count() > threads and time.monotonic() < deadline:
            time.sleep(0.05)
        body = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "attnserve_requests_total" in body  # and scrapes are served as before
    finally:
        for s in idle:
            s.close()
        server.shutdown()
