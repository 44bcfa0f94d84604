"""Traces: an OpenTelemetry span for each call to the model's services, exported over OTLP/gRPC.

With ``--otlp-endpoint`` (a collector's OTLP/gRPC address: an OpenTelemetry Collector, Jaeger,
Tempo), each call answered is a SERVER span named ``<service>/<method>``, with OpenTelemetry's RPC
attributes (``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``), the
caller's, and what a call not answered OK was told (``attnserve.detail``) and why (``error.type``, its
ErrorInfo reason). Its parent is the caller's span where the
call carried a W3C ``traceparent``, so the server's span sits in the client's trace; otherwise it
starts a trace. Encode's and AttentionMap's spans have two children, ``queue`` (waiting for a
batch) and ``compute`` (the batch the call's texts ran in), and a generation's a ``queue`` child
(waiting for a slot) with its tokens, finish reason and time to first token as attributes: where
a slow call's time went. Calls refused by the guard (no key, a full server) are spans too.

What is sampled is the SDK's ``ParentBased(TraceIdRatioBased(ratio))``: a caller's decision is kept,
and of the traces the server starts, ``ratio`` are.

A sampled call's duration, in ``attnserve_request_duration_seconds``, carries its span's trace and
span ids as an OpenMetrics exemplar (Prometheus keeps them with exemplar storage on; Grafana links a
latency panel's slow buckets to the calls' traces). So the ids of a call's span, and whether it is
sampled, are chosen on the event loop as it is answered (``Ids``; the same decision the SDK's sampler
makes from them), and the span is made with them.

On the event loop a call costs only what the access log's record does, the caller's fields read
from its metadata (shared with the access log where both are on) and a tuple queued. The spans are
made, with the times the call gives, by a thread of their own, woken at most once every
MAKE_SECONDS, and exported by the SDK's batch processor from another: ~40 us of CPU a span there, ~100
for a call with its queue and compute (the SDK's own Python), on the same cores as the calls, which
``trace_sample_ratio`` cuts where the server starts the traces. At most QUEUED calls wait to be made
spans; past that they are dropped and counted, and said in the log. A collector that is down costs the
exports (said once a batch, at ERROR; the exporter's retries are not), never a call.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import random
import threading
import time
from typing import Any

import grpc

from service.logs import Gatherer, access, caller

log = logging.getLogger(__name__)

QUEUED = 10_000
MAKE_SECONDS = 0.2
SHUTDOWN_SECONDS = 5.0  # at stop, the most the spans not yet exported are waited for
EXPORT_TIMEOUT_SECONDS = 5.0  # one export to the collector

# the service of each method a span may be for (the v2 service's, the rest)
SERVICES = {
    **dict.fromkeys(("Encode", "AttentionMap", "Tokenize", "GetModelInfo", "Generate", "GenerateStream"),
                    "attnserve.v1.AttnServe"),
    **dict.fromkeys(("Check", "Watch"), "grpc.health.v1.Health"),
    "ServerReflectionInfo": "grpc.reflection.v1.ServerReflection",
}  # fmt: skip
V2 = "inference.GRPCInferenceService"
# gRPC codes a server's span is marked an error for (OpenTelemetry's RPC conventions): the others are
# the client's doing
SERVER_ERRORS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}

# Set by the servicer in the call's context as its work is done, read as the call is answered: when
# its texts were queued (time.monotonic), seconds queued, seconds computing (None: a generation), and
# attributes for its span
PHASES: contextvars.ContextVar[tuple[float, float, float | None, dict[str, Any]] | None] = contextvars.ContextVar(
    "phases", default=None
)

# A generation's span's caller fields and ids (trace id, span id, whether sampled), chosen as it
# starts (``choose_early``), so that its first token's exemplar, observed before the call is
# answered, names the span that ``answered`` then makes with them
CHOSEN: contextvars.ContextVar[tuple[dict[str, str], int, int, bool] | None] = contextvars.ContextVar(
    "chosen", default=None
)

_current: Tracing | None = None


def active() -> bool:
    """Whether calls are traced (``PHASES`` is worth setting)."""
    return _current is not None


def answered(
    rpc: str, code: str, seconds: float, context: Any, detail: str, access_log: bool, reason: str = ""
) -> dict[str, str] | None:
    """A call answered ``code`` (for ``reason``, an error's) after ``seconds``: its access record where
    ``access_log`` is on, and its span where calls are traced, the caller's fields read from its
    metadata once for both. The
    exemplar for its duration where its span is sampled: the span's ``trace_id`` and ``span_id``
    (the record carries that ``trace_id`` too, where the server started the trace)."""
    tracing = _current
    if tracing is None:
        if access_log:
            access(rpc, code, seconds, context, detail, reason=reason)
        return None
    if (chosen := CHOSEN.get()) is not None:
        who, trace_id, span_id, sampled = chosen
    else:
        who = caller(context)
        trace_id, span_id, sampled = tracing.ids.choose(who)
    exemplar = ids_of(trace_id, span_id) if sampled else None
    if access_log:  # in the trace the server started, where it is sampled, as in the caller's
        started = sampled and "trace_id" not in who
        access(rpc, code, seconds, context, detail, {**who, "trace_id": f"{trace_id:032x}"} if started else who, reason)
    call = (time.time(), time.monotonic(), rpc, code, seconds, who, detail, reason, PHASES.get(), trace_id, span_id)
    tracing.note(call)
    return exemplar


def choose_early(context: Any) -> None:
    """Where calls are traced: choose the call's span's ids now (``CHOSEN``), for ``exemplar``."""
    if (tracing := _current) is not None:
        who = caller(context)
        CHOSEN.set((who, *tracing.ids.choose(who)))


def exemplar() -> dict[str, str] | None:
    """The exemplar of the call's span, where its ids were chosen early and it is sampled."""
    chosen = CHOSEN.get()
    if chosen is None or not chosen[3]:
        return None
    return ids_of(chosen[1], chosen[2])


def ids_of(trace_id: int, span_id: int) -> dict[str, str]:
    """A span's ids as an exemplar's labels: W3C's hex, 32 and 16 digits."""
    return {"trace_id": f"{trace_id:032x}", "span_id": f"{span_id:016x}"}


LOW_64 = (1 << 64) - 1  # the bits of a trace id that TraceIdRatioBased decides on


class Ids:
    """The ids of a call's span, chosen on the event loop as the call is answered, and given to the
    SDK as it makes that span on the tracer's thread (as its IdGenerator; the spans' children, and
    anything else, get random ones)."""

    def __init__(self, ratio: float) -> None:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        self.bound = TraceIdRatioBased(ratio).bound  # the sampler's own: sampled where the low 64 bits are under
        self.random = RandomIdGenerator()
        self.trace_id = self.span_id = 0  # the next span's, where given (the tracer's thread alone)

    def choose(self, who: dict[str, str]) -> tuple[int, int, bool]:
        """A span's trace id (the caller's where it sent a traceparent), span id, and whether it is
        sampled, as ``ParentBased(TraceIdRatioBased)`` decides: the caller's decision, or the ratio's."""
        span_id = random.getrandbits(64) or 1
        if "trace_id" in who:
            return int(who["trace_id"], 16), span_id, bool(int(who.get("trace_flags", "00"), 16) & 1)
        trace_id = random.getrandbits(128) or 1
        return trace_id, span_id, (trace_id & LOW_64) < self.bound

    def generate_trace_id(self) -> int:
        given, self.trace_id = self.trace_id, 0
        return given or self.random.generate_trace_id()

    def generate_span_id(self) -> int:
        given, self.span_id = self.span_id, 0
        return given or self.random.generate_span_id()

    def is_trace_id_random(self) -> bool:  # (the W3C random-trace-id flag: these are, all 128 bits)
        return True


class Tracing:
    def __init__(self, endpoint: str, ratio: float, attributes: dict[str, str]) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # a retry's warning each second while a collector is down; a batch that fails is still said
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.ERROR)
        insecure = not endpoint.startswith("https://")
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=EXPORT_TIMEOUT_SECONDS)
        # service.name: attnserve, unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name it
        resource = Resource.create(attributes)
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "attnserve"}))
        self.ids = Ids(ratio)
        self.provider = TracerProvider(
            resource=resource,
            sampler=ParentBased(TraceIdRatioBased(ratio)),
            id_generator=self.ids,  # type: ignore[arg-type]
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("attnserve")
        self.endpoint = endpoint
        self.calls: collections.deque[tuple[Any, ...]] = collections.deque()
        self.dropped = 0
        self.said = 0  # drops said in the log so far
        self.gatherer: Gatherer | None = None

    def start(self) -> None:
        global _current
        self.gatherer = Gatherer("tracer", MAKE_SECONDS, self._make)
        _current = self
        log.info("traces to %s over OTLP/gRPC", self.endpoint)

    def note(self, call: tuple[Any, ...]) -> None:
        if len(self.calls) >= QUEUED:
            self.dropped += 1  # (the event loop's alone)
            return
        self.calls.append(call)
        if self.gatherer is not None:
            self.gatherer.poke()

    def _make(self) -> None:
        if self.dropped > self.said:
            log.warning("%d call(s) not traced: they came faster than their spans were made", self.dropped - self.said)
            self.said = self.dropped
        for _ in range(len(self.calls)):
            try:
                self._span(*self.calls.popleft())
            except Exception:  # a span of its own that cannot be made must not end the others
                log.exception("a call's span could not be made")

    def _span(
        self,
        wall: float,
        mono: float,
        rpc: str,
        code: str,
        seconds: float,
        who: dict[str, str],
        detail: str,
        reason: str,
        phases: tuple[float, float, float | None, dict[str, Any]] | None,
        trace_id: int,
        span_id: int,
    ) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

        def ns(monotonic: float) -> int:  # a time.monotonic() as the wall clock's nanoseconds
            return int((wall - (mono - monotonic)) * 1e9)

        parent = None
        if "trace_id" in who:
            flags = TraceFlags(int(who.get("trace_flags", "00"), 16) & TraceFlags.SAMPLED)
            remote = SpanContext(int(who["trace_id"], 16), int(who["span_id"], 16), True, flags)
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        service = SERVICES.get(rpc, V2)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc,
            "rpc.grpc.status_code": GRPC_CODES.get(code, 2),
            "client.address": who.get("peer", ""),
        }
        if "client" in who:
            attributes["attnserve.client"] = who["client"]
        if "request_id" in who:
            attributes["attnserve.request_id"] = who["request_id"]
        if detail:
            attributes["attnserve.detail"] = detail
        if reason:  # (OpenTelemetry's attribute for the class of error a call ended with)
            attributes["error.type"] = reason
        if phases is not None:
            attributes.update(phases[3])
        start = ns(mono - seconds)
        if parent is None:  # (the caller's trace id is its span's)
            self.ids.trace_id = trace_id
        self.ids.span_id = span_id
        span = self.tracer.start_span(
            f"{service}/{rpc}", context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start
        )
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, detail or code))
        if phases is not None and span.is_recording():
            queued, queue, compute, _ = phases
            inside = trace.set_span_in_context(span)
            self.tracer.start_span("queue", context=inside, start_time=ns(queued)).end(end_time=ns(queued + queue))
            if compute is not None:
                ran = queued + queue
                self.tracer.start_span("compute", context=inside, start_time=ns(ran)).end(end_time=ns(ran + compute))
        span.end(end_time=int(wall * 1e9))

    def stop(self) -> None:
        """Make the spans of the calls answered, and export them, for SHUTDOWN_SECONDS at most."""
        global _current
        if _current is self:
            _current = None
        if self.gatherer is not None:
            self.gatherer.end(SHUTDOWN_SECONDS)
        done = threading.Thread(target=self.provider.shutdown, name="tracer-shutdown", daemon=True)
        done.start()
        done.join(SHUTDOWN_SECONDS)


GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}  # (rpc.grpc.status_code is the number)
