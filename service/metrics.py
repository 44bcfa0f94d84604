"""Prometheus metrics of the service, on their own registry and HTTP port.

Names follow Prometheus conventions (``attnserve_..._seconds``, ``_total``); labels take a
small fixed set of values (RPC names, status codes, graph names), never a per-request one.
"""

from __future__ import annotations

import bisect
import platform
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)


class Tally:
    """One series of a ``BufferedHistogram``: its pending values, bucket counts and sum, and each
    bucket's latest exemplar."""

    FOLD = 4096  # pending values at most: a bound on memory between scrapes

    def __init__(self, bounds: np.ndarray) -> None:
        self._bounds = bounds
        self._upper = bounds.tolist()
        self._counts = np.zeros(len(bounds), np.int64)
        self._sum = 0.0
        self._pending: deque[float] = deque()  # append and popleft are atomic: no lock on the hot path
        self._lock = threading.Lock()  # for folding, which the observing thread and a scrape may both do
        self.exemplars: list[Exemplar | None] = [None] * len(bounds)

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        """Count ``value``; ``exemplar`` (labels: a trace's ids), where given, becomes its bucket's."""
        self._pending.append(value)
        if exemplar is not None:  # (one slot's store: a scrape reads the one before or this one)
            self.exemplars[bisect.bisect_left(self._upper, value)] = Exemplar(exemplar, value, time.time())
        if len(self._pending) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            n = len(self._pending)  # only this lock's holder takes values out: n are there to take
            if not n:
                return
            pending = self._pending
            values = np.fromiter((pending.popleft() for _ in range(n)), np.float64, n)
            # bucket i counts the values <= its bound (Prometheus' "le"); a NaN is counted in none, as Histogram does
            at = np.searchsorted(self._bounds, values[~np.isnan(values)], side="left")
            self._counts += np.bincount(at, minlength=len(self._bounds))
            self._sum += float(values.sum())

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative bucket counts and the sum, every value observed so far counted."""
        self._fold()
        with self._lock:
            return np.cumsum(self._counts).tolist(), self._sum


class BufferedHistogram:
    """A histogram whose observations cost the observer a deque append (~0.05 us).

    ``Histogram.observe`` takes two locks and scans its buckets, a few microseconds on every token
    of a stream and every request. Here the values are counted into the buckets in bulk, with
    numpy, once ``Tally.FOLD`` are pending and whenever the registry is scraped, so a scrape sees
    every value observed before it. It exposes the series a ``Histogram`` of the same name, labels
    and buckets does (``_bucket``, ``_count``, ``_sum``), without ``_created``; ``labels(...)``
    gives a series to observe, as a ``Histogram``'s does, with each bucket's latest exemplar (shown
    to an OpenMetrics scrape) where one was given."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
        labelnames: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = np.array([*sorted(float(b) for b in buckets), float("inf")])
        self._series: dict[tuple[str, ...], Tally] = {}
        self._lock = threading.Lock()
        self._unlabelled = None if self._labelnames else self.labels()
        registry.register(self)

    def labels(self, *values: object) -> Tally:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self.name}: {len(values)} label values for labels {self._labelnames}")
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, Tally(self._bounds))
        return series

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        if self._unlabelled is None:
            raise ValueError(f"{self.name} has labels {self._labelnames}: observe a series of labels(...)")
        self._unlabelled.observe(value, exemplar)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self._labelnames)
        bounds = [floatToGoString(b) for b in self._bounds.tolist()]
        with self._lock:
            series = list(self._series.items())
        for key, tally in series:
            cumulative, total = tally.snapshot()
            buckets = [
                (bound, count) if exemplar is None else (bound, count, exemplar)
                for bound, count, exemplar in zip(bounds, cumulative, list(tally.exemplars), strict=True)
            ]
            family.add_metric(list(key), buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self._labelnames)


class LogDrops:
    """``attnserve_log_records_dropped_total``: log records dropped since the process started, for a
    stderr not read as fast as they came (``service.logs``)."""

    NAME = "attnserve_log_records_dropped"
    HELP = "Log records dropped, their writer's queue full: stderr was not read as fast as they came"

    def collect(self) -> Iterator[CounterMetricFamily]:
        from service.logs import dropped

        yield CounterMetricFamily(self.NAME, self.HELP, value=dropped())

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.HELP)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "attnserve_requests_total", "RPCs answered, by method and status code", ["rpc", "code"], registry=r
        )
        self.errors = Counter(
            "attnserve_errors_total",
            "Calls the server answered with an error, by method and reason: the google.rpc.ErrorInfo reason the "
            "client was told (QUEUE_FULL, CALLS_AT_LIMIT, CLIENT_CALL_RATE, INVALID_INPUT, ...; README's table "
            "of them), so that which limit or check refuses calls shows apart; each also in attnserve_requests_total",
            ["rpc", "reason"],
            registry=r,
        )
        # every histogram is observed on a request's or a batch's path: counted in bulk (BufferedHistogram)
        self.request_seconds = BufferedHistogram(
            "attnserve_request_duration_seconds", "Time from arrival to answer", LATENCY_BUCKETS, r, ["rpc"]
        )
        self.queue_seconds = BufferedHistogram(
            "attnserve_queue_duration_seconds",
            "Time a request waited for its batch, by its priority",
            LATENCY_BUCKETS,
            r,
            ["graph", "priority"],
        )
        self.compute_seconds = BufferedHistogram(
            "attnserve_compute_duration_seconds", "Time one batch took to run", LATENCY_BUCKETS, r, ["graph"]
        )
        self.batch_size = BufferedHistogram("attnserve_batch_size", "Requests per batch", BATCH_BUCKETS, r, ["graph"])
        self.batch_tokens = BufferedHistogram(
            "attnserve_batch_padded_tokens", "Tokens per batch, padding included", TOKEN_BUCKETS, r, ["graph"]
        )
        self.queue_depth = Gauge("attnserve_queue_depth", "Requests waiting for a batch", ["graph"], registry=r)
        self.tokens = Counter("attnserve_tokens_total", "Real (unpadded) tokens processed", ["graph"], registry=r)
        self.dropped = Counter(
            "attnserve_dropped_texts_total",
            "Texts refused or dropped before the model ran them, by reason: queue_full (refused, no room), "
            "deadline (refused or dropped, its deadline could not be met), cancelled (its caller went away), "
            "displaced (queued, then refused to make room for work of a higher priority)",
            ["graph", "reason"],
            registry=r,
        )
        self.without_request = Counter(
            "attnserve_calls_without_request_total",
            "Calls answered because their request did not come (also counted in attnserve_requests_total), by "
            "reason: read_timeout (DEADLINE_EXCEEDED), evicted (RESOURCE_EXHAUSTED, at a full bound), draining "
            "(UNAVAILABLE, the server stopping), idle (RESOURCE_EXHAUSTED, at a full bound: a v2 or reflection "
            "stream with no request in progress)",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "attnserve_calls_in_progress", "Calls of the model's services being served now", registry=r
        )
        self.provider = Gauge(
            "attnserve_execution_provider",
            "1 for the ONNX Runtime provider running the model",
            ["provider"],
            registry=r,
        )
        self.device_requested = Gauge(
            "attnserve_device_requested", "1 for the device the server was configured to use", ["device"], registry=r
        )
        self.model = Info("attnserve_model", "The model being served", registry=r)
        self.build = Info("attnserve_build", "Versions of the serving stack", registry=r)
        self.build.info({"python": platform.python_version(), "platform": sys.platform})
        self.ready = Gauge("attnserve_ready", "1 once the model is loaded and warmed up", registry=r)
        r.register(LogDrops())
        self.api_keys = Gauge(
            "attnserve_api_keys", "API keys the model's calls may carry now (0: no key is needed)", registry=r
        )
        self.tls_rejected = Gauge(
            "attnserve_tls_certificate_rejected",
            "1 while the TLS certificate's files hold what the server could not take (it serves the one before)",
            registry=r,
        )
        self.model_rejected = Gauge(
            "attnserve_model_dir_rejected",
            "1 while the model directory holds what the server could not load (it serves the model before)",
            registry=r,
        )
        self.generation_deaths = Counter(
            "attnserve_generation_loop_deaths",
            "Generation loops ended by a fault of the server's own; the model serving is loaded anew after one",
            registry=r,
        )
        self.truncated = Counter(
            "attnserve_inputs_truncated",
            "Inputs cut to fit the model's context, as their clients asked, by what they were (text: Encode's "
            "and AttentionMap's; prompt: a generation's) and the end dropped (start, end)",
            ["input", "end"],
            registry=r,
        )
        self.model_reloads = Counter(
            "attnserve_model_reloads_total",
            "Model directories loaded while serving (changed, or loaded anew for a generation loop that died), by "
            "outcome: loaded (and serving), or rejected",
            ["outcome"],
            registry=r,
        )
        self.api_keys_rejected = Gauge(
            "attnserve_api_keys_file_rejected",
            "1 while the API keys file holds what the server could not take (it accepts the keys read before)",
            registry=r,
        )

        # generation
        self.gen_ttft_seconds = BufferedHistogram(
            "attnserve_generate_time_to_first_token_seconds", "Arrival to first generated token", LATENCY_BUCKETS, r
        )
        self.gen_itl_seconds = BufferedHistogram(
            "attnserve_generate_inter_token_latency_seconds",
            "Time between a sequence's consecutive tokens",
            LATENCY_BUCKETS,
            r,
        )
        self.gen_e2e_seconds = BufferedHistogram(
            "attnserve_generate_duration_seconds", "Arrival to the end of generation", (*LATENCY_BUCKETS, 30.0, 60.0), r
        )
        self.gen_queue_seconds = BufferedHistogram(
            "attnserve_generate_queue_duration_seconds",
            "Arrival to admission into the running batch, by the sequence's priority",
            LATENCY_BUCKETS,
            r,
            ["priority"],
        )
        self.gen_running = Gauge("attnserve_generate_running_sequences", "Sequences in the running batch", registry=r)
        self.gen_waiting = Gauge("attnserve_generate_waiting_sequences", "Requests waiting for a slot", registry=r)
        self.gen_prompt_tokens = Counter(
            "attnserve_generate_prompt_tokens_total", "Prompt tokens prefilled", registry=r
        )
        self.gen_generated_tokens = Counter("attnserve_generate_generated_tokens_total", "Tokens generated", registry=r)
        # with API keys, (client, kind): the tokens the model read and generated for each client, read by
        # the scrape (service.guard.ClientCalls). Each key is written by one thread only: "input"
        # (Encode's and AttentionMap's texts) by the event loop, "prompt" and "generated" by the
        # generation loop, as each sequence ends
        self.tokens_by_client: dict[tuple[str, str], int] = {}
        self.gen_batch_size = BufferedHistogram(
            "attnserve_generate_decode_batch_size", "Sequences in one decode step", BATCH_BUCKETS, r
        )
        self.gen_finished = Counter(
            "attnserve_generate_finished_total",
            "Generations ended, by reason: a finish reason the caller was told, or cancelled (the caller went "
            "away), deadline (its deadline passed) or error",
            ["reason"],
            registry=r,
        )

    def init_series(self, graphs: tuple[str, ...] = ("encode", "attention")) -> None:
        """Create the known labelled series at zero, so that rate() and alerts see them before the first event."""
        for graph in graphs:
            self.queue_depth.labels(graph).set(0)
            self.tokens.labels(graph)
            for reason in ("queue_full", "cancelled", "deadline"):
                self.dropped.labels(graph, reason)
        for reason in ("length", "stop", "end_of_text", "context_full", "cancelled", "deadline", "error"):
            self.gen_finished.labels(reason)
        for reason in ("read_timeout", "evicted", "draining", "idle"):
            self.without_request.labels(reason)
        for outcome in ("loaded", "rejected"):
            self.model_reloads.labels(outcome)
        for kind, end in (("text", "start"), ("text", "end"), ("prompt", "start")):  # (a prompt's end is never cut)
            self.truncated.labels(kind, end)

    def serve(self, port: int, addr: str = "0.0.0.0") -> ScrapeServer:
        """Expose /metrics over HTTP on a thread of its own; returns the server (``.shutdown()`` stops it)."""
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

        class On(ScrapeServer):  # IPv4 or IPv6, as the address is
            address_family = family

        server = make_server(addr, port, make_wsgi_app(self.registry), On, handler_class=QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server


# A scrape connection that sends nothing for this long is closed. prometheus_client's own server
# waits for ever, with a thread a connection: 300 connections that sent half a request held 300
# threads in the serving process, and past ~160 the port took seconds to accept a new one.
SCRAPE_IDLE_SECONDS = 10.0
SCRAPE_CONNECTIONS = 32  # served at once; one more is closed at once (a Prometheus scrapes a target on one)


class QuietHandler(WSGIRequestHandler):
    """A scrape's request, read within SCRAPE_IDLE_SECONDS, and not logged."""

    timeout = SCRAPE_IDLE_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ScrapeServer(ThreadingWSGIServer):
    """prometheus_client's threaded server, with at most SCRAPE_CONNECTIONS connections served at once
    and a longer listen backlog than socketserver's 5."""

    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.slots = threading.BoundedSemaphore(SCRAPE_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once, no thread started
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
