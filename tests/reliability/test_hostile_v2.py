"""Hostile input on the Open Inference Protocol endpoint: malformed bytes and fuzzed tensors.

Only client errors (and NOT_FOUND for models that are not here), never INTERNAL or UNKNOWN,
on unary calls and on streams alike; health SERVING throughout.
"""

from __future__ import annotations

import struct
import time
import urllib.parse
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.errors import MAX_MESSAGE_CHARS
from service.kserve import ENCODE, MODELS, PARAMETERS, join_bytes
from tests.reliability.conftest import ALLOWED, SERVING, health
from tests.service.conftest import ServerThread
from tests.service.test_server import rich

V2_ALLOWED = ALLOWED | {grpc.StatusCode.NOT_FOUND}
SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


@pytest.mark.parametrize("data", [b"\x00", b"\n\x01\xff", b"\x2a\x05abc", b"\xff" * 64])
def test_malformed_bytes_get_invalid_argument_on_every_v2_method(guarded: ServerThread, data: bytes) -> None:
    channel = grpc.insecure_channel(guarded.address)
    for method in SERVICE.methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        try:
            if method.client_streaming:
                list(channel.stream_stream(path)(iter([data]), timeout=10))
            else:
                channel.unary_unary(path)(data, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert "<class" not in (e.details() or "")
        # bytes that happen to parse as a message with no fields set are a valid (empty) request
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), (path, code)
        if method.name in ("ModelInfer", "ModelStreamInfer", "ModelReady") and data == b"\n\x01\xff":
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, code)
    assert health(guarded.address) == SERVING


def _param() -> st.SearchStrategy[v2.InferParameter]:
    return st.one_of(
        st.booleans().map(lambda v: v2.InferParameter(bool_param=v)),
        st.integers(-(2**63), 2**63 - 1).map(lambda v: v2.InferParameter(int64_param=v)),
        st.integers(0, 2**64 - 1).map(lambda v: v2.InferParameter(uint64_param=v)),
        st.floats(allow_nan=True, allow_infinity=True).map(lambda v: v2.InferParameter(double_param=v)),
        st.one_of(st.text(max_size=20), st.sampled_from(["mean", "last", "end", "error", '["\\n"]', "["])).map(
            lambda v: v2.InferParameter(string_param=v)
        ),
    )


PARAMETER_NAMES = sorted({k for p in PARAMETERS.values() for k in p} | {"triton_final_response", "bogus", "timeout"})
TEXTS = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["", "<|endoftext|>", "the king " * 200])), max_size=5)


@st.composite
def infer_requests(draw: Any) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(
        model_name=draw(st.one_of(st.sampled_from(MODELS), st.text(max_size=10))),
        model_version=draw(st.sampled_from(["", "", "1", "x"])),
        id=draw(st.text(max_size=8)),
    )
    for key in draw(st.lists(st.sampled_from(PARAMETER_NAMES), max_size=4, unique=True)):
        request.parameters[key].CopyFrom(draw(_param()))
    texts = [t.encode() for t in draw(TEXTS)]
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["TEXT", "TEXT", "INPUT0", ""])),
            datatype=draw(st.sampled_from(["BYTES", "BYTES", "FP32", "INT64", ""])),
            shape=draw(st.one_of(st.just([len(texts)]), st.lists(st.integers(-3, 10**12), max_size=3))),
        )
        form = draw(st.sampled_from(["raw", "typed", "garbage", "fp32"]))
        if form == "raw":
            request.raw_input_contents.append(join_bytes(texts))
        elif form == "typed":
            tensor.contents.bytes_contents.extend(texts)
        elif form == "garbage":
            request.raw_input_contents.append(draw(st.binary(max_size=30)) + struct.pack("<I", 2**31))
        else:
            tensor.contents.fp32_contents.extend([1.0, float("nan")])
    for name in draw(st.lists(st.sampled_from(["EMBEDDING", "TEXT", "ATTENTION", "TOKENS", "X"]), max_size=2)):
        request.outputs.add(name=name)
    return request


def test_fuzzed_tensors_get_only_client_errors(guarded: ServerThread) -> None:
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(guarded.address))
    seen: set[grpc.StatusCode] = set()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=infer_requests())
    def check(request: v2.ModelInferRequest) -> None:
        try:
            stub.ModelInfer(request, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            assert "<class" not in (e.details() or ""), e.details()
            code = e.code()
        assert code in V2_ALLOWED, (request, code)
        seen.add(code)

    check()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    assert health(guarded.address, timeout=1.0) == SERVING


def test_fuzzed_streams_report_errors_in_the_stream(guarded: ServerThread) -> None:
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(guarded.address))

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests=st.lists(infer_requests(), min_size=1, max_size=4))
    def check(requests: list[v2.ModelInferRequest]) -> None:
        for r in requests:
            r.id = "fuzz"
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=60))
        for r in responses:
            assert "internal error" not in r.error_message, r.error_message
        assert sum(1 for r in responses if r.error_message) <= len(requests)

    check()
    assert health(guarded.address, timeout=1.0) == SERVING


@pytest.mark.parametrize("char", ["\u00e9", "\U0001f451"], ids=["two bytes", "four bytes"])
def test_a_long_name_echoed_in_an_error_reaches_the_client_cut_short(guarded: ServerThread, char: str) -> None:
    """Errors that name what the request gave (its model, input or parameter) stay within what a
    trailer carries, with the field still named, and with the google.rpc.Status that says the same
    where it fits beside the message."""
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(guarded.address))
    long = char * 50_000  # two (four) bytes of UTF-8, six (twelve) percent-encoded, each
    text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"hi")
    cases = [
        (v2.ModelInferRequest(model_name=long), grpc.StatusCode.NOT_FOUND, "model_name: no model"),
        (
            v2.ModelInferRequest(model_name=ENCODE, inputs=[v2.ModelInferRequest.InferInputTensor(name=long)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].name",
        ),
        (
            v2.ModelInferRequest(
                model_name=ENCODE, inputs=[text], parameters={long: v2.InferParameter(bool_param=True)}
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameters.",
        ),
    ]
    for request, code, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=10)
        assert e.value.code() == code, e.value.details()
        assert e.value.details().startswith(needle) and len(e.value.details()) <= MAX_MESSAGE_CHARS
        # as sent: the message percent-encoded, binary values in base64
        message = urllib.parse.quote(e.value.details(), safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~", encoding="utf-8")
        sent = len(message) + sum(len(k) + len(v) * 4 // 3 for k, v in e.value.trailing_metadata() or ())
        assert sent < 8192, sent
        rich(e.value)  # where it carries a Status, that Status says the same
    assert health(guarded.address) == SERVING


def test_a_stream_whose_client_reads_nothing_stops_taking_requests(guarded: ServerThread) -> None:
    """A client that sends requests on a v2 stream and reads no responses: once what its connection
    holds is full, the server serves no more of them (before, it served all it was sent and kept every
    answer, without end), and the server goes on serving others."""
    text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[16])
    text.contents.bytes_contents.extend([b"hello there"] * 16)  # 16 embeddings an answer: the windows fill sooner
    request = v2.ModelInferRequest(model_name=ENCODE, inputs=[text])
    sent = 0

    def requests() -> Any:
        nonlocal sent
        for _ in range(200_000):
            sent += 1
            yield request

    def served() -> float:
        samples = (s for m in guarded.server.metrics.requests.collect() for s in m.samples)
        return sum(s.value for s in samples if s.labels.get("rpc") == "ModelStreamInfer" and s.name.endswith("_total"))

    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(guarded.address))
    before = served()
    call = stub.ModelStreamInfer(requests())  # its responses are never read
    try:
        last, since, end = served(), time.monotonic(), time.monotonic() + 30
        while time.monotonic() - since < 2.0 and time.monotonic() < end:
            time.sleep(0.1)
            if (now := served()) != last:
                last, since = now, time.monotonic()
        assert time.monotonic() - since >= 2.0, f"still serving: {last - before:.0f} requests of {sent} sent"
        assert last - before < sent
        assert health(guarded.address) == SERVING
        responses = list(stub.ModelStreamInfer(iter([request] * 3), timeout=10))  # another stream, unhindered
        assert len(responses) == 3 and not any(r.error_message for r in responses)
    finally:
        call.cancel()
