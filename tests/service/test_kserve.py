"""The Open Inference Protocol endpoint over real gRPC, with the project's own stubs of it.

The same numbers as the native RPCs for the same input, in raw and typed form; bad tensors
named in INVALID_ARGUMENT; unknown models and versions NOT_FOUND; the methods not served
UNIMPLEMENTED with a message. tests/service/test_tritonclient.py calls it with tritonclient.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.client import decode_probabilities
from service.kserve import join_bytes, split_bytes
from tests.service.conftest import ServerThread, config, fail_first_encode, wait_for
from tests.service.test_server import metrics, reason, violations

TEXTS = ["To be, or not to be", "the king speaks", "a"]


@pytest.fixture(scope="module")
def v2_stub(served: ServerThread) -> v2_grpc.GRPCInferenceServiceStub:
    return v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.address))


def text_input(texts: list[str], raw: bool = True) -> dict[str, Any]:
    tensor = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[len(texts)])
    encoded = [t.encode() for t in texts]
    if raw:
        return {"inputs": [tensor], "raw_input_contents": [join_bytes(encoded)]}
    tensor.contents.bytes_contents.extend(encoded)
    return {"inputs": [tensor]}


def infer(model: str, texts: list[str], raw: bool = True, **params: Any) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model, id="r1", **text_input(texts, raw))
    for key, value in params.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    return request


def output(response: v2.ModelInferResponse, name: str) -> np.ndarray | list[bytes]:
    """An output tensor from either form, as a client would read it."""
    (i,) = [i for i, o in enumerate(response.outputs) if o.name == name]
    tensor = response.outputs[i]
    if response.raw_output_contents:
        raw = response.raw_output_contents[i]
        if tensor.datatype == "BYTES":
            return split_bytes(raw, name)
        dtype = {"FP32": "<f4", "INT32": "<i4"}[tensor.datatype]
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape))
    if tensor.datatype == "BYTES":
        return list(tensor.contents.bytes_contents)
    values = tensor.contents.fp32_contents if tensor.datatype == "FP32" else tensor.contents.int_contents
    return np.array(values).reshape(tuple(tensor.shape))


def test_server_and_model_metadata(served: ServerThread, v2_stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    info = served.stub().GetModelInfo(pb.GetModelInfoRequest())
    assert v2_stub.ServerLive(v2.ServerLiveRequest()).live
    assert v2_stub.ServerReady(v2.ServerReadyRequest()).ready
    assert v2_stub.ServerMetadata(v2.ServerMetadataRequest()).name == "attnserve"
    for model in ("attnserve-encode", "attnserve-generate", "attnserve-attention"):
        assert v2_stub.ModelReady(v2.ModelReadyRequest(name=model)).ready
        assert v2_stub.ModelReady(v2.ModelReadyRequest(name=model, version=info.version)).ready
    meta = v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="attnserve-encode"))
    assert list(meta.versions) == [info.version]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("TEXT", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("EMBEDDING", "FP32", [-1, info.hidden_size]),
        ("TOKEN_COUNT", "INT32", [-1]),
    ]
    meta = v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="attnserve-attention"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("ATTENTION", "FP32", [info.num_layers, info.num_heads, -1, -1]),
        ("TOKENS", "BYTES", [-1]),
    ]
    meta = v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="attnserve-generate"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("TEXT", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("TEXT", "BYTES", [1])]


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_encode_equals_the_native_rpc(
    served: ServerThread, v2_stub: v2_grpc.GRPCInferenceServiceStub, raw: bool
) -> None:
    native = served.stub().Encode(pb.EncodeRequest(texts=TEXTS, pooling=pb.POOLING_LAST, normalize=True))
    response = v2_stub.ModelInfer(infer("attnserve-encode", TEXTS, raw, pooling="last", normalize=True))
    assert response.id == "r1" and response.model_name == "attnserve-encode"
    assert bool(response.raw_output_contents) == raw
    got = output(response, "EMBEDDING")
    assert isinstance(got, np.ndarray) and got.shape == (3, native.dimensions)
    np.testing.assert_allclose(got, np.array([e.values for e in native.embeddings]), atol=1e-5)
    assert list(output(response, "TOKEN_COUNT")) == [e.token_count for e in native.embeddings]


def test_requested_outputs_only(v2_stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    request = infer("attnserve-encode", TEXTS)
    request.outputs.add(name="TOKEN_COUNT")
    response = v2_stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["TOKEN_COUNT"] and len(response.raw_output_contents) == 1


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_attention_equals_the_native_rpc(
    served: ServerThread, v2_stub: v2_grpc.GRPCInferenceServiceStub, raw: bool
) -> None:
    native = served.stub().AttentionMap(pb.AttentionMapRequest(text=TEXTS[0]))
    response = v2_stub.ModelInfer(infer("attnserve-attention", TEXTS[:1], raw))
    got = output(response, "ATTENTION")
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, decode_probabilities(native))
    assert [t.decode() for t in output(response, "TOKENS")] == list(native.tokens)


def test_generate_equals_the_native_rpc(served: ServerThread, v2_stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    params = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 20, "seed": 7}
    native = served.stub().Generate(pb.GenerateRequest(prompt="ROMEO:", **params))
    response = v2_stub.ModelInfer(infer("attnserve-generate", ["ROMEO:"], **params))
    assert output(response, "TEXT") == [native.text.encode()]
    assert response.parameters["generated_tokens"].int64_param == native.usage.generated_tokens
    assert response.parameters["finish_reason"].string_param == "length"
    # streamed: one response per token group, concatenating to the same text, the last one final
    stream = list(v2_stub.ModelStreamInfer(iter([infer("attnserve-generate", ["ROMEO:"], **params)])))
    assert not any(r.error_message for r in stream)
    # a group holds more than one token if the client lags: on a loaded machine a short generation
    # can be done before the first group is sent, and then comes as one response
    assert 1 <= len(stream) <= native.usage.generated_tokens
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in stream]
    assert finals == [False] * (len(stream) - 1) + [True]
    assert b"".join(output(r.infer_response, "TEXT")[0] for r in stream).decode() == native.text


def test_a_stream_serves_many_requests_and_reports_each_failure(v2_stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    requests = [
        infer("attnserve-encode", TEXTS),
        infer("attnserve-generate", ["hi"], max_new_tokens=3, temperature=0.0),
        infer("no-such-model", ["x"]),
        infer("attnserve-attention", ["the king"]),
    ]
    for i, r in enumerate(requests):
        r.id = f"req{i}"
    responses = list(v2_stub.ModelStreamInfer(iter(requests)))
    errors = [r for r in responses if r.error_message]
    assert [(r.infer_response.id, r.error_message.split(":")[0]) for r in errors] == [("req2", "model_name")]
    ids = [r.infer_response.id for r in responses if not r.error_message]
    assert ids.count("req0") == 1 and ids.count("req3") == 1 and 1 <= ids.count("req1") <= 3


def test_a_fault_of_the_servers_own_in_a_stream_is_reported_under_the_id_it_is_logged_with(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's error_message for it says only that the server logged it, and as which error;
    the stream goes on."""
    st = ServerThread(config(model_dir)).start()
    try:
        fail_first_encode(st)
        stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address))
        with caplog.at_level(logging.ERROR, "service.servicer"):
            first = list(stub.ModelStreamInfer(iter([infer("attnserve-encode", TEXTS)]), timeout=30))
            second = list(stub.ModelStreamInfer(iter([infer("attnserve-encode", TEXTS)]), timeout=30))
        (failed,) = first
        assert failed.error_message.startswith("internal error") and "device" not in failed.error_message
        error = failed.error_message.rsplit(" ", 1)[-1]
        (record,) = [r for r in caplog.records if getattr(r, "error_id", None) == error]
        assert record.rpc == "ModelStreamInfer" and "mind" in str(record.exc_info[1])  # type: ignore
        assert not second[0].error_message
    finally:
        st.stop()


def test_attention_maps_give_their_bytes_back_on_either_protocol(
    v2_stub: v2_grpc.GRPCInferenceServiceStub, served: ServerThread
) -> None:
    budget = served.server.servicer.attention_budget
    served.stub().AttentionMap(pb.AttentionMapRequest(text="the king"))
    v2_stub.ModelInfer(infer("attnserve-attention", ["the king"]))
    list(v2_stub.ModelStreamInfer(iter([infer("attnserve-attention", ["the king"])] * 3)))
    # a stream that ends (its deadline passed) before its answers are sent gives them back too
    with contextlib.suppress(grpc.RpcError):
        list(v2_stub.ModelStreamInfer(iter([infer("attnserve-attention", ["the king"])] * 3), timeout=0.005))
    deadline = time.monotonic() + 5
    while budget.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert budget.held == 0


def test_empty_final_response_when_asked(v2_stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    request = infer("attnserve-generate", ["hi"], max_new_tokens=2, temperature=0.0)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    stream = list(v2_stub.ModelStreamInfer(iter([request])))
    assert [len(r.infer_response.outputs) for r in stream][-1] == 0
    assert all(len(r.infer_response.outputs) == 1 for r in stream[:-1])
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in stream]
    assert finals == [False] * (len(stream) - 1) + [True]


def bad(request: v2.ModelInferRequest, **changes: Any) -> v2.ModelInferRequest:
    """A copy of request with its raw contents or its first input's scalar fields replaced."""
    request = v2.ModelInferRequest.FromString(request.SerializeToString())
    for key, value in changes.items():
        if key == "raw":
            del request.raw_input_contents[:]
            request.raw_input_contents.extend(value)
        elif key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        else:
            setattr(request.inputs[0], key, value)
    return request


def cases() -> Iterator[tuple[str, v2.ModelInferRequest, grpc.StatusCode, str]]:
    ok = infer("attnserve-encode", TEXTS)
    yield "unknown model", infer("bert", TEXTS), grpc.StatusCode.NOT_FOUND, "model_name:"
    wrong_version = infer("attnserve-encode", TEXTS)
    wrong_version.model_version = "99"
    yield "unknown version", wrong_version, grpc.StatusCode.NOT_FOUND, "model_version:"
    yield "wrong datatype", bad(ok, datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype:"
    yield "wrong name", bad(ok, name="INPUT0"), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].name:"
    yield "shape and contents disagree", bad(ok, shape=[2]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]:"
    missing = v2.ModelInferRequest(model_name="attnserve-encode")
    yield "missing input", missing, grpc.StatusCode.INVALID_ARGUMENT, "inputs:"
    truncated = bad(ok, raw=[struct.pack("<I", 50) + b"short"])
    yield "raw bytes cut short", truncated, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents[0]:"
    yield (
        "invalid UTF-8",
        bad(ok, raw=[join_bytes([b"\xff\xfe", b"a", b"b"])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("inputs[0] element 0:"),
    )
    two = infer("attnserve-generate", ["a", "b"])
    yield "two prompts", two, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].shape:"
    yield (
        "unknown parameter",
        infer("attnserve-encode", TEXTS, poolin="mean"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("parameters.poolin:"),
    )
    yield (
        "wrong parameter type",
        infer("attnserve-encode", TEXTS, normalize="yes"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("parameters.normalize:"),
    )
    yield (
        "bad choice",
        infer("attnserve-encode", TEXTS, pooling="max"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ("parameters.pooling:"),
    )
    unknown_output = infer("attnserve-encode", TEXTS)
    unknown_output.outputs.add(name="LOGITS")
    yield "unknown output", unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "outputs[0].name:"
    yield "native limits apply", infer("attnserve-encode", ["x"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "texts:"
    hot = infer("attnserve-generate", ["hi"], temperature=-1.0)
    yield "native validation applies", hot, grpc.StatusCode.INVALID_ARGUMENT, "temperature"
    long = infer("attnserve-attention", ["word " * 400])
    yield "over the context", long, grpc.StatusCode.INVALID_ARGUMENT, "text:"


@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_bad_tensors_are_named(v2_stub: v2_grpc.GRPCInferenceServiceStub, case: tuple[Any, ...]) -> None:
    _, request, code, needle = case
    with pytest.raises(grpc.RpcError) as e:
        v2_stub.ModelInfer(request, timeout=10)
    assert e.value.code() == code, e.value.details()
    assert needle in e.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT and needle.endswith(":") and " " not in needle:
        assert violations(e.value)[0][0] == needle[:-1]  # the field, in a BadRequest too
    # and why, in the same words as the native API's
    assert reason(e.value) == ("MODEL_NOT_FOUND" if code == grpc.StatusCode.NOT_FOUND else "INVALID_INPUT")


def test_truncation_parameter(v2_stub: v2_grpc.GRPCInferenceServiceStub, served: ServerThread) -> None:
    n = served.stub().GetModelInfo(pb.GetModelInfoRequest()).limits.max_seq_len
    response = v2_stub.ModelInfer(infer("attnserve-attention", ["word " * 400], truncation="end"))
    assert response.parameters["truncated"].bool_param
    assert output(response, "ATTENTION").shape[-1] == n  # type: ignore[union-attr]


def test_truncation_start_keeps_the_end_of_a_text_and_a_prompt_with_room_to_generate(
    v2_stub: v2_grpc.GRPCInferenceServiceStub, served: ServerThread
) -> None:
    n = served.stub().GetModelInfo(pb.GetModelInfoRequest()).limits.max_seq_len
    text = "the king speaks " * 30 + "and the queen weeps"
    response = v2_stub.ModelInfer(infer("attnserve-attention", [text], truncation="start"))
    assert response.parameters["truncated"].bool_param
    assert b"".join(output(response, "TOKENS")).endswith(b" queen weeps")  # type: ignore[arg-type]
    generated = v2_stub.ModelInfer(
        infer("attnserve-generate", [text], max_new_tokens=5, temperature=0.0, truncation="start")
    )
    usage = generated.parameters
    assert usage["prompt_truncated"].bool_param and usage["prompt_tokens"].int64_param == n - 5
    assert (
        not v2_stub.ModelInfer(infer("attnserve-generate", ["hi"], max_new_tokens=5))
        .parameters["prompt_truncated"]
        .bool_param
    )
    with pytest.raises(grpc.RpcError) as e:
        v2_stub.ModelInfer(infer("attnserve-generate", [text], truncation="end"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TRUNCATION_START" in e.value.details()


def timed(model: str, micros: int | str, texts: list[str] | None = None) -> v2.ModelInferRequest:
    """A request carrying Triton's timeout parameter, as tritonclient's infer(timeout=...) sends it."""
    request = (
        infer(model, texts or ["the king speaks"], max_new_tokens=4)
        if model == "attnserve-generate"
        else (infer(model, texts or ["the king speaks"]))
    )
    if isinstance(micros, str):
        request.parameters["timeout"].string_param = micros
    else:
        request.parameters["timeout"].int64_param = micros
    return request


def test_tritons_timeout_parameter_bounds_each_request(
    v2_stub: v2_grpc.GRPCInferenceServiceStub, served: ServerThread
) -> None:
    """Microseconds from the request's arrival, as a deadline of its own beside the call's; 0 is none."""
    for model in ("attnserve-encode", "attnserve-attention", "attnserve-generate"):
        with pytest.raises(grpc.RpcError) as e:
            v2_stub.ModelInfer(timed(model, 1), timeout=30)  # over before the model could be asked
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason(e.value) == "DEADLINE_PASSED", model
        assert v2_stub.ModelInfer(timed(model, 30_000_000), timeout=30).outputs
        assert v2_stub.ModelInfer(timed(model, 0), timeout=30).outputs
    for bad in (-5, "soon"):
        with pytest.raises(grpc.RpcError) as e:
            v2_stub.ModelInfer(timed("attnserve-encode", bad), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameters.timeout" in e.value.details()
    # on a stream, each request's own: the one over its time is answered so, the next served
    stream = v2_stub.ModelStreamInfer(iter([timed("attnserve-encode", 1), timed("attnserve-encode", 0)]), timeout=30)
    answers = sorted(list(stream), key=lambda r: not r.error_message)
    assert "deadline" in answers[0].error_message and not answers[1].error_message


def test_tritons_priority_parameter_is_the_priority_of_the_requests_work(
    v2_stub: v2_grpc.GRPCInferenceServiceStub, served: ServerThread
) -> None:
    """1 high, 2 normal, 3 low, 0 the default, as tritonclient's infer(priority=...) sends it (a
    uint64), for each model; anything else is refused, naming the parameter."""

    def counts() -> dict[tuple[str, str], float]:
        m = metrics(served)
        queued = {(dict(k)["graph"], dict(k)["priority"]): v for (n, k), v in m.items()
                  if n == "attnserve_queue_duration_seconds_count"}  # fmt: skip
        queued |= {("generate", dict(k)["priority"]): v for (n, k), v in m.items()
                   if n == "attnserve_generate_queue_duration_seconds_count"}  # fmt: skip
        return queued

    for model, graph in (("attnserve-encode", "encode"), ("attnserve-attention", "attention"),
                         ("attnserve-generate", "generate")):  # fmt: skip
        for value, level in ((1, "high"), (2, "normal"), (3, "low"), (0, "normal")):
            request = timed(model, 0)
            request.parameters["priority"].uint64_param = value
            before = counts()
            assert v2_stub.ModelInfer(request, timeout=30).outputs
            grew = {key for key, n in counts().items() if n > before.get(key, 0)}
            assert grew == {(graph, level)}, (model, value)
    for bad in (4, "high", 1.0):
        request = timed("attnserve-encode", 0)
        param = request.parameters["priority"]
        if isinstance(bad, str):
            param.string_param = bad
        elif isinstance(bad, float):
            param.double_param = bad
        else:
            param.int64_param = bad
        with pytest.raises(grpc.RpcError) as e:
            v2_stub.ModelInfer(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameters.priority" in e.value.details()


def test_methods_not_served_say_so(served: ServerThread) -> None:
    channel = grpc.insecure_channel(served.address)
    call = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")
    with pytest.raises(grpc.RpcError) as e:
        call(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and reason(e.value) == "METHOD_NOT_SERVED"
    assert "RepositoryIndex is not served" in e.value.details() and "ModelInfer" in e.value.details()
    # a long name, within what the server reads of a path, is named cut short, in a trailer the client reads
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/inference.GRPCInferenceService/" + "\u00e9" * 3000)(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert e.value.details().startswith("\u00e9" * 100) and "ModelInfer" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        v2_grpc.GRPCInferenceServiceStub(channel).ModelReady(v2.ModelReadyRequest(name="gpt"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and reason(e.value) == "MODEL_NOT_FOUND"


def test_counted_under_its_own_rpc_label(served: ServerThread, v2_stub: v2_grpc.GRPCInferenceServiceStub) -> None:
    def count(rpc: str, code: str) -> float:
        from urllib.request import urlopen

        text = urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics").read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "attnserve_requests_total" and sample.labels == {"rpc": rpc, "code": code}:
                    return sample.value
        return 0.0

    before = count("ModelInfer", "OK"), count("ModelInfer", "NOT_FOUND"), count("ModelStreamInfer", "OK")
    v2_stub.ModelInfer(infer("attnserve-encode", TEXTS))
    with pytest.raises(grpc.RpcError):
        v2_stub.ModelInfer(infer("nope", TEXTS))
    list(v2_stub.ModelStreamInfer(iter([infer("attnserve-encode", TEXTS)] * 2)))
    after = count("ModelInfer", "OK"), count("ModelInfer", "NOT_FOUND"), count("ModelStreamInfer", "OK")
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 2]


def test_shutdown_finishes_stream_requests_in_progress_and_ends_idle_streams(model_dir: Path) -> None:
    """An open ModelStreamInfer (tritonclient keeps one open for good) must not hold the drain for
    the whole grace period: its generation in progress completes, then the stream ends UNAVAILABLE."""
    st = ServerThread(config(model_dir)).start()
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address))
    outgoing: queue.Queue[v2.ModelInferRequest | None] = queue.Queue()
    outgoing.put(infer("attnserve-generate", ["ROMEO:"], max_new_tokens=40, temperature=0.0))
    stream = stub.ModelStreamInfer(iter(outgoing.get, None), timeout=60)
    first = next(stream)  # generation is under way
    t0 = time.monotonic()
    stopper = threading.Thread(target=st.stop, kwargs={"grace": 20.0})
    stopper.start()
    rest = []
    with pytest.raises(grpc.RpcError) as e:
        for r in stream:
            rest.append(r)
    stopper.join()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 < 10  # not the 20 s grace
    responses = [first, *rest]
    assert not any(r.error_message for r in responses)
    assert responses[-1].infer_response.parameters["triton_final_response"].bool_param
    assert responses[-1].infer_response.parameters["generated_tokens"].int64_param == 40
    outgoing.put(None)


def test_at_a_full_bound_the_stream_idle_longest_gives_its_place_to_a_call_that_comes(model_dir: Path) -> None:
    """tritonclient keeps a ModelStreamInfer open for good, and a stream with no request in progress
    held its place of max_concurrent_calls all the same: four such streams kept every other call out
    of a server with four places, for as long as their clients kept them. At a full bound the stream
    idle longest, once it has had no request in progress for a second (``stalled_seconds``), is ended
    with RESOURCE_EXHAUSTED to make room, as a call stalled for its request is; while they are fresh
    the newcomer is refused instead, and a stream whose requests keep coming is not ended."""
    st = ServerThread(config(model_dir, max_concurrent_calls=4)).start()
    channel = grpc.insecure_channel(st.address)
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    idle = ("attnserve_calls_without_request_total", (("reason", "idle"),))
    outgoing: list[queue.Queue[v2.ModelInferRequest | None]] = [queue.Queue() for _ in range(4)]
    try:
        streams = []
        for q in outgoing:
            q.put(infer("attnserve-encode", ["the king"]))
            streams.append(stub.ModelStreamInfer(iter(q.get, None), timeout=60))
            assert not next(streams[-1]).error_message
        assert metrics(st)[idle] == 0
        with pytest.raises(grpc.RpcError) as e:  # fresh: the newcomer is refused, as at any full server
            st.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        until = time.monotonic() + st.server.guard.stalled_seconds + 0.3
        while time.monotonic() < until:  # the first stream idles; the others' requests keep coming
            for q, stream in zip(outgoing[1:], streams[1:], strict=True):
                q.put(infer("attnserve-encode", ["the king"]))
                assert not next(stream).error_message
            time.sleep(0.2)
        assert len(st.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1
        with pytest.raises(grpc.RpcError) as e:
            next(streams[0])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this stream had no request in progress for the longest" in (e.value.details() or "")
        assert reason(e.value) == "IDLE_STREAM"
        for q, stream in zip(outgoing[1:], streams[1:], strict=True):  # the others go on
            q.put(infer("attnserve-encode", ["the king"]))
            assert not next(stream).error_message
        assert metrics(st)[idle] == 1
    finally:
        for q in outgoing:
            q.put(None)
        channel.close()
        st.stop()


def test_a_stream_with_a_request_in_progress_is_not_idle(model_dir: Path) -> None:
    """A stream opened first, whose one request is in progress (the model held on it for 3 s), is not
    the stream idle longest: at a full bound the one opened after it and sent nothing gives its
    place, and the first's answer comes."""
    st = ServerThread(config(model_dir, max_concurrent_calls=2)).start()
    engine = st.server.engine
    assert engine is not None
    real, held = engine.runtime.encode, threading.Event()

    def slow(ids: Any, mask: Any) -> Any:
        if not held.is_set():
            held.set()
            time.sleep(3.0)
        return real(ids, mask)

    engine.runtime.encode = slow  # type: ignore[method-assign]
    channel = grpc.insecure_channel(st.address)
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    busy: queue.Queue[v2.ModelInferRequest | None] = queue.Queue()
    idle: queue.Queue[v2.ModelInferRequest | None] = queue.Queue()
    try:
        busy.put(infer("attnserve-encode", ["the king"]))
        working = stub.ModelStreamInfer(iter(busy.get, None), timeout=30)
        assert held.wait(10)  # its request is in the model
        waiting = stub.ModelStreamInfer(iter(idle.get, None), timeout=30)
        assert wait_for(lambda: st.server.guard.in_flight == 2)
        time.sleep(st.server.guard.stalled_seconds + 0.2)  # both opened over a second ago
        native = st.stub().Encode.future(pb.EncodeRequest(texts=["hi"]), timeout=30)  # queued behind the model
        with pytest.raises(grpc.RpcError) as e:
            next(waiting)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no request in progress for the longest" in (e.value.details() or "")
        assert not next(working).error_message  # answered once the model lets go
        assert len(native.result().embeddings) == 1
    finally:
        busy.put(None)
        idle.put(None)
        channel.close()
        st.stop()


def test_a_stream_ended_by_a_malformed_message_leaves_no_task_behind(served: ServerThread) -> None:
    """The handler ends (INVALID_ARGUMENT) while it waits on its response queue: that wait must end
    with it, not stay pending on the server's loop (alive, or collected and reported as destroyed)."""
    reported: list[str] = []
    served.loop.set_exception_handler(lambda loop, context: reported.append(context["message"]))

    def queue_waits() -> int:
        async def count() -> int:
            gc.collect()  # a pending task no longer referenced is destroyed here, and reported
            return sum("Queue.get" in repr(t.get_coro()) for t in asyncio.all_tasks() if not t.done())

        return int(served.call(count()))

    outgoing: queue.Queue[bytes | None] = queue.Queue()
    try:
        before = queue_waits()
        channel = grpc.insecure_channel(served.address)
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=v2.ModelStreamInferResponse.FromString,
        )
        outgoing.put(infer("attnserve-encode", ["the king speaks"]).SerializeToString())
        responses = call(iter(outgoing.get, None), timeout=20)
        assert not next(responses).error_message  # answered: the handler now waits on its queue
        time.sleep(0.2)
        outgoing.put(b"\xff\xff\xff")  # the next request does not parse
        with pytest.raises(grpc.RpcError) as e:
            next(responses)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        channel.close()
        time.sleep(0.2)  # the handler's cleanup runs on the server's loop
        assert queue_waits() == before
        assert not [m for m in reported if "destroyed but it is pending" in m]
    finally:
        served.loop.set_exception_handler(None)
        outgoing.put(None)
