"""Traces (``otlp_endpoint``): the spans a real OTLP/gRPC receiver is sent, one a call, in the caller's trace."""

from __future__ import annotations

import contextlib
import logging
import threading
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from protos.attnserve.v1 import attnserve_pb2 as pb
from service.config import ServerConfig
from tests.service.conftest import ServerThread, config, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as a collector is one: what it was sent, span by span."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []
        self.resources: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                self.resources.append(attributes(resource_spans.resource.attributes))
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@contextlib.contextmanager
def receiving() -> Iterator[tuple[Receiver, int]]:
    """A Receiver served on a loopback port, and the port."""
    server = grpc.server(futures.ThreadPoolExecutor(4))
    got = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(got, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield got, port
    finally:
        server.stop(0)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    with receiving() as served:
        yield served


def by_name(spans: list[trace_pb2.Span], name: str) -> list[trace_pb2.Span]:
    return [s for s in spans if s.name == name]


def test_each_call_is_a_span_in_its_callers_trace_with_its_queue_and_compute(
    model_dir: Path, receiver: tuple[Receiver, int]
) -> None:
    got, port = receiver
    st = ServerThread(config(model_dir, otlp_endpoint=f"http://127.0.0.1:{port}")).start()
    try:
        stub = st.stub()
        traceparent = [("traceparent", f"00-{TRACE_ID}-{PARENT}-01"), ("x-request-id", "req-7")]
        encoded = stub.Encode(pb.EncodeRequest(texts=["the king speaks", "my lord"]), metadata=traceparent, timeout=30)
        made = stub.Generate(
            pb.GenerateRequest(prompt="The king", max_new_tokens=4, priority=pb.PRIORITY_LOW), timeout=30
        )
        streamed = list(stub.GenerateStream(pb.GenerateRequest(prompt="Good sir", max_new_tokens=3), timeout=30))
        with pytest.raises(grpc.RpcError):
            stub.Encode(pb.EncodeRequest(), timeout=30)  # INVALID_ARGUMENT: a span, not an error's
        assert wait_for(lambda: len(got.spans) >= 7, 15)  # made and sent within a second or so
    finally:
        st.stop()
    spans = got.spans
    encode, invalid = by_name(spans, "attnserve.v1.AttnServe/Encode")
    assert encode.trace_id.hex() == TRACE_ID and encode.parent_span_id.hex() == PARENT  # in the caller's trace
    assert encode.kind == trace_pb2.Span.SPAN_KIND_SERVER
    said = attributes(encode.attributes)
    assert said["rpc.system"] == "grpc" and said["rpc.service"] == "attnserve.v1.AttnServe"
    assert (said["rpc.method"], said["rpc.grpc.status_code"]) == ("Encode", 0)
    assert said["attnserve.request_id"] == "req-7" and said["attnserve.texts"] == 2
    assert said["attnserve.priority"] == "normal"
    assert said["client.address"].startswith("ipv4:127.0.0.1:")
    children = {s.name: s for s in spans if s.parent_span_id == encode.span_id}
    assert set(children) == {"queue", "compute"}
    queue, compute = children["queue"], children["compute"]
    timings = encoded.timings
    assert abs((queue.end_time_unix_nano - queue.start_time_unix_nano) / 1e9 - timings.queue_seconds) < 1e-5
    assert abs((compute.end_time_unix_nano - compute.start_time_unix_nano) / 1e9 - timings.compute_seconds) < 1e-5
    assert encode.start_time_unix_nano <= queue.start_time_unix_nano <= queue.end_time_unix_nano
    assert queue.end_time_unix_nano <= compute.start_time_unix_nano + 1000  # (ns rounding)
    assert compute.end_time_unix_nano <= encode.end_time_unix_nano
    assert (encode.end_time_unix_nano - encode.start_time_unix_nano) / 1e9 >= timings.compute_seconds
    assert encode.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    # a client error is the client's: its span is not marked an error
    said = attributes(invalid.attributes)
    assert said["rpc.grpc.status_code"] == 3 and said["attnserve.detail"] == "texts: at least one text is required"
    assert said["error.type"] == "INVALID_INPUT"  # the reason its client was sent
    assert "attnserve.detail" not in attributes(encode.attributes) and "error.type" not in attributes(encode.attributes)
    assert invalid.status.code == trace_pb2.Status.STATUS_CODE_UNSET
    # with no traceparent, a call starts a trace of its own
    (generate,) = by_name(spans, "attnserve.v1.AttnServe/Generate")
    assert generate.trace_id.hex() != TRACE_ID and not generate.parent_span_id
    said = attributes(generate.attributes)
    assert said["attnserve.generated_tokens"] == made.usage.generated_tokens
    assert said["attnserve.prompt_tokens"] == made.usage.prompt_tokens and said["attnserve.finish_reason"] == "length"
    assert said["attnserve.priority"] == "low"
    assert [s.name for s in spans if s.parent_span_id == generate.span_id] == ["queue"]
    (stream,) = by_name(spans, "attnserve.v1.AttnServe/GenerateStream")
    assert attributes(stream.attributes)["attnserve.generated_tokens"] == streamed[-1].usage.generated_tokens
    assert got.resources[0]["service.name"] == "attnserve"


def test_sampling_keeps_the_callers_decision(
    model_dir: Path, receiver: tuple[Receiver, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trace_sample_ratio 0: of the traces the server would start none is sampled, and a caller's
    decision, sampled or not, is kept. The guard's refusals are spans too. OpenTelemetry's own
    variables name the service where they are set."""
    got, port = receiver
    monkeypatch.setenv("OTEL_SERVICE_NAME", "attnserve-eu")
    keys = tmp_path / "keys"
    keys.write_text("alice key-a\n")
    cfg = config(model_dir, otlp_endpoint=f"http://127.0.0.1:{port}", trace_sample_ratio=0.0, api_keys_file=keys)
    st = ServerThread(cfg).start()
    key = ("authorization", "Bearer key-a")
    try:
        stub = st.stub()
        for flags in ("01", "00"):
            parent = ("traceparent", f"00-{TRACE_ID}-{PARENT}-{flags}")
            stub.Encode(pb.EncodeRequest(texts=[f"flags {flags}"]), metadata=[parent, key], timeout=30)
        stub.Encode(pb.EncodeRequest(texts=["no parent"]), metadata=[key], timeout=30)
        with pytest.raises(grpc.RpcError) as e:  # refused by the guard: no key
            stub.Encode(pb.EncodeRequest(texts=["x"]), metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        st.stop()  # the spans made and sent before it returns
    encodes = by_name(got.spans, "attnserve.v1.AttnServe/Encode")
    assert len(encodes) == 2  # the sampled caller's call, and the refused one
    said = sorted((attributes(s.attributes) for s in encodes), key=lambda a: a["rpc.grpc.status_code"])
    assert [(a["rpc.grpc.status_code"], a.get("attnserve.client")) for a in said] == [(0, "alice"), (16, None)]
    assert all(s.trace_id.hex() == TRACE_ID for s in encodes)
    assert {r["service.name"] for r in got.resources} == {"attnserve-eu"}
    with pytest.raises(ValueError, match=r"trace_sample_ratio must be in 0\.\.1"):
        ServerConfig(trace_sample_ratio=1.5)
    with pytest.raises(ValueError, match="otlp_endpoint is http://host:port"):
        ServerConfig(otlp_endpoint="collector:4317")


def test_a_collector_that_is_down_costs_no_call(model_dir: Path) -> None:
    """Spans to an address nothing listens on: calls are answered as ever, and the stop is bounded."""
    st = ServerThread(config(model_dir, otlp_endpoint="http://127.0.0.1:9")).start()
    try:
        for _ in range(20):
            assert st.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings
    finally:
        st.stop()


def exemplars(
    st: ServerThread, rpc: str | None, family_name: str = "attnserve_request_duration_seconds"
) -> list[dict[str, str]]:
    """The exemplars of ``rpc``'s attnserve_request_duration_seconds buckets (or of ``family_name``'s,
    which has no rpc label), as an OpenMetrics scrape (what Prometheus asks for with exemplar storage
    on) gives them."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{st.server.metrics_port}/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    body = urllib.request.urlopen(request).read().decode()
    return [
        dict(sample.exemplar.labels)
        for family in text_string_to_metric_families(body)
        if family.name == family_name
        for sample in family.samples
        if sample.labels.get("rpc") == rpc and sample.exemplar is not None
    ]


def test_a_traced_calls_duration_links_to_its_span(model_dir: Path, receiver: tuple[Receiver, int]) -> None:
    """attnserve_request_duration_seconds carries, as an OpenMetrics exemplar on the bucket a sampled
    call fell in, its span's trace and span ids: from a slow bucket on a latency panel straight to a
    slow call's trace. Calls not sampled give none, and the caller's trace is the one linked to."""
    got, port = receiver
    cfg = config(model_dir, otlp_endpoint=f"http://127.0.0.1:{port}", trace_sample_ratio=0.0)
    st = ServerThread(cfg).start()
    try:
        stub = st.stub()
        stub.Encode(pb.EncodeRequest(texts=["no parent: not sampled"]), timeout=30)
        stub.Encode(pb.EncodeRequest(texts=["a caller's, not sampled"]),
                    metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-00")], timeout=30)  # fmt: skip
        assert exemplars(st, "Encode") == []
        stub.Encode(pb.EncodeRequest(texts=["a caller's, sampled"]),
                    metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")], timeout=30)  # fmt: skip
        assert wait_for(lambda: len(by_name(got.spans, "attnserve.v1.AttnServe/Encode")) == 1, 15)
        (span,) = by_name(got.spans, "attnserve.v1.AttnServe/Encode")
        assert exemplars(st, "Encode") == [{"trace_id": TRACE_ID, "span_id": span.span_id.hex()}]
    finally:
        st.stop()


def test_the_server_starts_the_traces_it_links_to(
    model_dir: Path, receiver: tuple[Receiver, int], caplog: pytest.LogCaptureFixture
) -> None:
    """A call with no traceparent, sampled by trace_sample_ratio, links to the trace the server
    starts, from its duration's exemplar (a generation's time to first token's too) and from its
    access record."""
    got, port = receiver
    caplog.set_level(logging.INFO, "attnserve.access")
    st = ServerThread(config(model_dir, otlp_endpoint=f"http://127.0.0.1:{port}", access_log=True)).start()
    try:
        st.stub().Generate(pb.GenerateRequest(prompt="The king", max_new_tokens=3), timeout=30)
        assert wait_for(lambda: len(by_name(got.spans, "attnserve.v1.AttnServe/Generate")) == 1, 15)
        (span,) = by_name(got.spans, "attnserve.v1.AttnServe/Generate")
        assert not span.parent_span_id
        assert exemplars(st, "Generate") == [{"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex()}]
        # and its time to first token, observed before the call was answered, names the same span
        ttft = exemplars(st, None, "attnserve_generate_time_to_first_token_seconds")
        assert ttft == [{"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex()}]
    finally:
        st.stop()
    (record,) = [r for r in caplog.records if r.name == "attnserve.access"]
    assert record.trace_id == span.trace_id.hex() and f"trace_id={span.trace_id.hex()}" in record.getMessage()
