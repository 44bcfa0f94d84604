"""The server over real gRPC on loopback: results, batching, limits, errors, health, metrics."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.attnserve.v1 import attnserve_pb2 as pb
from service import client
from service.batcher import CPU_BATCH_TOKENS, CUDA_BATCH_TOKENS
from service.cli import build_parser
from service.client import decode_probabilities
from service.errors import INTERNAL_MESSAGE
from service.runtime import Runtime, RuntimeOptions
from service.servicer import add_embeddings
from tests.service.conftest import ServerThread, config, fail_first_encode

TEXTS = ["Good sir", "The king speaks of the crown, and the queen weeps for her grave.", "a", "My lord laughs at"]


@pytest.fixture(scope="module")
def rt(model_dir: Path) -> Runtime:
    return Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))


def alone(rt: Runtime, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([rt.tokenizer.encode(text, add_special_tokens=False).ids])
    out = rt.encode(ids, np.ones_like(ids))
    return out.pooled_mean[0], out.pooled_last[0]


def metrics(st: ServerThread) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics").read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }


def test_encode_equals_the_runtime_alone(served: ServerThread, rt: Runtime) -> None:
    r = served.stub().Encode(pb.EncodeRequest(texts=TEXTS))
    assert r.dimensions == 32 and len(r.embeddings) == len(TEXTS)
    for text, e in zip(TEXTS, r.embeddings, strict=True):
        np.testing.assert_allclose(e.values, alone(rt, text)[0], atol=1e-5)
        assert e.token_count == len(rt.tokenizer.encode(text).ids) and not e.truncated
    last = served.stub().Encode(pb.EncodeRequest(texts=TEXTS[:2], pooling=pb.POOLING_LAST, normalize=True))
    for text, e in zip(TEXTS, last.embeddings, strict=False):
        want = alone(rt, text)[1]
        np.testing.assert_allclose(e.values, want / np.linalg.norm(want), atol=1e-5)
    assert r.timings.compute_seconds > 0 and r.timings.total_seconds >= r.timings.queue_seconds


@pytest.mark.parametrize("dimensions", [1, 31, 32, 33, 128, 4096])  # the values' byte length as 1, 2 and 3 varint bytes
def test_embeddings_from_bytes_equal_protobufs_own(dimensions: int) -> None:
    rng = np.random.default_rng(dimensions)
    vectors = rng.standard_normal((3, dimensions)).astype(np.float32)
    vectors[0, 0] = np.nan
    vectors[1, -1] = -np.inf
    vectors[2, 0] = -0.0
    vectors[2, -1] = np.float32(1e-45)  # subnormal
    got = pb.EncodeResponse()
    add_embeddings(got.embeddings, vectors, [5, 0, 64], [False, True, False])
    want = pb.EncodeResponse(
        embeddings=[
            pb.Embedding(values=v.tolist(), token_count=n, truncated=cut)
            for v, n, cut in zip(vectors, [5, 0, 64], [False, True, False], strict=True)
        ]
    )
    assert got.SerializeToString() == want.SerializeToString()  # bit for bit, NaN and -0.0 included
    assert got.embeddings[1].truncated and list(got.embeddings[1].values)[-1] == -np.inf


def test_attention_map_equals_the_runtime_alone(served: ServerThread, rt: Runtime) -> None:
    text = TEXTS[1]
    r = served.stub().AttentionMap(pb.AttentionMapRequest(text=text))
    ids = np.array([list(r.token_ids)])
    want = rt.attention(ids, np.ones_like(ids))[0]
    got = decode_probabilities(r)
    assert tuple(r.shape) == want.shape == (2, 2, len(r.tokens), len(r.tokens))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert "".join(r.tokens) == text
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert len(r.probabilities) == got.size * 4  # packed fp32: one field, not repeated floats

    half = served.stub().AttentionMap(
        pb.AttentionMapRequest(
            token_ids=pb.TokenIds(ids=r.token_ids), layers=[1], heads=[1, 0], precision=pb.PRECISION_FP16
        )
    )
    assert tuple(half.shape) == (1, 2, len(r.tokens), len(r.tokens)) and len(half.probabilities) == got[:1].size * 2
    np.testing.assert_allclose(decode_probabilities(half)[0], want[1, [1, 0]], atol=1e-3)


def test_concurrent_requests_of_mixed_lengths_each_get_their_own_answer(served: ServerThread, rt: Runtime) -> None:
    stub = served.stub()
    rng = np.random.default_rng(0)
    words = "the king queen fool ghost love sir night crown sword moon rose grave sea heart fate".split()
    texts = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(48)]
    before = metrics(served)
    futures = [stub.Encode.future(pb.EncodeRequest(texts=[t])) for t in texts]
    for t, f in zip(texts, futures, strict=True):
        np.testing.assert_allclose(f.result().embeddings[0].values, alone(rt, t)[0], atol=1e-5)
    after = metrics(served)
    key = ("attnserve_batch_size_count", (("graph", "encode"),))
    batches = after[key] - before.get(key, 0)
    assert batches < len(texts)  # they were batched


def rich(e: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a call's error carried in grpc-status-details-bin, checked against its
    code and message as gRPC's clients check it; None where it carried none."""
    raw = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")  # type: ignore[attr-defined]
    if raw is None:
        return None
    status = status_pb2.Status.FromString(raw)
    assert (status.code, status.message) == (e.code().value[0], e.details())  # type: ignore[attr-defined]
    return status


M = TypeVar("M", bound=Message)


def detail(status: status_pb2.Status | None, kind: type[M]) -> M | None:
    """The detail of type ``kind`` (BadRequest, RetryInfo, ErrorInfo) a google.rpc.Status carries, if any."""
    assert status is not None, "no google.rpc.Status"
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            found = kind()
            packed.Unpack(found)
            return found
    return None


def reason_of(status: status_pb2.Status | None) -> str:
    """The reason of the ErrorInfo a google.rpc.Status carries, which every error the server answers does."""
    info = detail(status, error_details_pb2.ErrorInfo)
    assert info is not None and info.domain == "attnserve", status
    return info.reason


def reason(e: grpc.RpcError) -> str:
    """The reason a call's error said, in its google.rpc.Status's ErrorInfo."""
    return reason_of(rich(e))


def violations(e: grpc.RpcError) -> list[tuple[str, str]]:
    """The fields and descriptions of the BadRequest a call's error carried."""
    bad = detail(rich(e), error_details_pb2.BadRequest)
    assert bad is not None, "no BadRequest"
    return [(v.field, v.description) for v in bad.field_violations]


def test_bad_inputs_get_invalid_argument_naming_the_field(served: ServerThread) -> None:
    stub = served.stub()
    long_text = "the king speaks of the crown " * 40
    cases = [
        (stub.Encode, pb.EncodeRequest(), "texts"),
        (stub.Encode, pb.EncodeRequest(texts=["ok", ""]), "texts[1]"),
        (stub.Encode, pb.EncodeRequest(texts=["x"] * 65), "65 texts"),
        (stub.Encode, pb.EncodeRequest(texts=[long_text]), "context"),
        (stub.AttentionMap, pb.AttentionMapRequest(), "input"),
        (stub.AttentionMap, pb.AttentionMapRequest(text="hi", layers=[2]), "layers"),
        (stub.AttentionMap, pb.AttentionMapRequest(text="hi", heads=[0, 5]), "heads"),
        (stub.AttentionMap, pb.AttentionMapRequest(text="hi", layers=[0, 0]), "repeated"),
        (stub.AttentionMap, pb.AttentionMapRequest(token_ids=pb.TokenIds(ids=[1, 99999])), "vocab_size"),
        (stub.AttentionMap, pb.AttentionMapRequest(text=""), "text"),
        (stub.AttentionMap, pb.AttentionMapRequest(text="hi", precision=7), "precision"),
    ]
    for method, request, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            method(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (request, e.value.details())
        assert needle in e.value.details(), (needle, e.value.details())
        # and as Google's API design has it, for clients that read it: the field in a BadRequest, in
        # a google.rpc.Status of the same code and message (grpc-status-details-bin)
        field, description = (e.value.details() or "").split(": ", 1)
        assert violations(e.value) == [(field, description)]
        assert reason(e.value) == "INVALID_INPUT"
    # several problems, each its field (a description may hold "; " of its own)
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(
            pb.GenerateRequest(prompt="hi", max_new_tokens=4, temperature=-1, top_p=2, top_logprobs=30), timeout=30
        )
    assert [field for field, _ in violations(e.value)] == ["temperature", "top_p", "top_logprobs"]
    # bytes that are no request name no field: a reason of their own, and no BadRequest
    with pytest.raises(grpc.RpcError) as e:
        served_raw = grpc.insecure_channel(served.address).unary_unary("/attnserve.v1.AttnServe/Encode")
        served_raw(b"\xff\xff\xff", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(e.value) == "MALFORMED_REQUEST"
    assert detail(rich(e.value), error_details_pb2.BadRequest) is None
    # and the server still serves
    assert stub.Encode(pb.EncodeRequest(texts=["still here"])).embeddings


def test_truncation_when_asked(served: ServerThread) -> None:
    long_text = "the king speaks of the crown " * 40
    r = served.stub().Encode(pb.EncodeRequest(texts=[long_text], truncation=pb.TRUNCATION_END))
    assert r.embeddings[0].truncated and r.embeddings[0].token_count == 64


def truncated(st: ServerThread) -> dict[tuple[str, str], float]:
    """attnserve_inputs_truncated_total by (input, end)."""
    found = metrics(st).items()
    name = "attnserve_inputs_truncated_total"
    return {(labels[1][1], labels[0][1]): v for (series, labels), v in found if series == name}


def test_truncation_start_keeps_the_last_tokens(served: ServerThread) -> None:
    stub = served.stub()
    before = truncated(served)
    text = "the king speaks of the crown " * 40 + "and the queen weeps"
    ids = list(stub.Tokenize(pb.TokenizeRequest(texts=[text])).tokenizations[0].ids)
    assert len(ids) > 64
    r = stub.Encode(pb.EncodeRequest(texts=[text], truncation=pb.TRUNCATION_START))
    assert r.embeddings[0].truncated and r.embeddings[0].token_count == 64
    end = stub.Encode(pb.EncodeRequest(texts=[text], truncation=pb.TRUNCATION_END))
    assert r.embeddings[0].values != end.embeddings[0].values  # the other end of the text
    amap = stub.AttentionMap(pb.AttentionMapRequest(text=text, truncation=pb.TRUNCATION_START))
    assert list(amap.token_ids) == ids[-64:] and amap.truncated and amap.shape[-1] == 64
    by_ids = pb.AttentionMapRequest(token_ids=pb.TokenIds(ids=ids), truncation=pb.TRUNCATION_START)
    same = stub.AttentionMap(by_ids)
    assert list(same.token_ids) == ids[-64:] and same.truncated and same.probabilities == amap.probabilities
    with pytest.raises(grpc.RpcError) as e:
        stub.AttentionMap(pb.AttentionMapRequest(token_ids=pb.TokenIds(ids=ids)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TRUNCATION_START" in e.value.details()
    after = truncated(served)  # each text cut, counted by the end it lost
    assert after[("text", "start")] - before[("text", "start")] == 3
    assert after[("text", "end")] - before[("text", "end")] == 1
    assert after[("prompt", "start")] == before[("prompt", "start")]


def test_a_prompt_truncated_at_its_start_leaves_room_for_its_generation(served: ServerThread) -> None:
    """TRUNCATION_START drops a prompt's first tokens so that max_new_tokens fit in the context, and
    generates as from the tokens kept; without it, a prompt over the context is refused, saying how."""
    stub = served.stub()
    text = "the king speaks of the crown " * 40 + "and the queen weeps"
    ids = list(stub.Tokenize(pb.TokenizeRequest(texts=[text])).tokenizations[0].ids)
    greedy = {"max_new_tokens": 10, "temperature": 0.0}
    before = truncated(served)[("prompt", "start")]
    cut = stub.Generate(pb.GenerateRequest(prompt=text, truncation=pb.TRUNCATION_START, **greedy))
    assert cut.usage.prompt_truncated and cut.usage.prompt_tokens == 54
    # as if the prompt had been the text of its last 54 tokens
    kept = "".join(stub.Tokenize(pb.TokenizeRequest(texts=[text])).tokenizations[0].tokens[-54:])
    assert list(stub.Tokenize(pb.TokenizeRequest(texts=[kept])).tokenizations[0].ids) == ids[-54:]
    alone = stub.Generate(pb.GenerateRequest(prompt=kept, **greedy))
    assert not alone.usage.prompt_truncated and [t.token_id for t in cut.tokens] == [t.token_id for t in alone.tokens]
    streamed = list(stub.GenerateStream(pb.GenerateRequest(prompt=text, truncation=pb.TRUNCATION_START, **greedy)))
    assert streamed[-1].usage.prompt_truncated and streamed[-1].usage.prompt_tokens == 54
    assert not any(m.usage.prompt_truncated for m in streamed[:-1])
    assert "".join(m.text for m in streamed) == cut.text
    # a prompt within the context, but without room for all of max_new_tokens, is cut too
    near = stub.Generate(
        pb.GenerateRequest(prompt=kept, truncation=pb.TRUNCATION_START, max_new_tokens=20, temperature=0.0)
    )
    assert near.usage.prompt_truncated and near.usage.prompt_tokens == 44
    short = stub.Generate(pb.GenerateRequest(prompt="ROMEO:", truncation=pb.TRUNCATION_START, **greedy))
    assert not short.usage.prompt_truncated
    assert truncated(served)[("prompt", "start")] - before == 3  # the three cut, not the one that fitted
    # more new tokens than the context holds: one token of the prompt is kept
    most = stub.Generate(
        pb.GenerateRequest(prompt=text, truncation=pb.TRUNCATION_START, max_new_tokens=100, temperature=0.0)
    )
    assert most.usage.prompt_tokens == 1 and most.usage.prompt_truncated
    for request, needle in (
        (pb.GenerateRequest(prompt=text, **greedy), "set truncation to TRUNCATION_START"),
        (pb.GenerateRequest(prompt=text, truncation=pb.TRUNCATION_END, **greedy), "truncation: TRUNCATION_END"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_the_command_line_client_asks_for_truncation(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    text = "the king speaks of the crown " * 40 + "and the queen weeps"

    def run(*argv: str) -> tuple[int, str, str]:
        code = client.main(build_parser().parse_args(["client", "--address", served.address, *argv]))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("encode", text)
    assert code == 1 and "INVALID_ARGUMENT (INVALID_INPUT)" in err and "TRUNCATION_START" in err
    code, out, _ = run("encode", "--truncation", "start", text)
    assert code == 0 and "64 tokens (truncated at its start)" in out
    code, out, _ = run("attention", "--truncation", "start", text)
    assert code == 0 and out.split("\n")[0].endswith(" weeps']")  # tokens: [..., ' queen', ' weeps']
    code, out, _ = run("generate", "--truncation", "start", "--max-new-tokens", "4", "--temperature", "0", text)
    assert code == 0 and "the prompt's first tokens dropped to 60" in out
    code, out, _ = run("generate", "--stream", "--truncation", "start", "--max-new-tokens", "4", text)
    assert code == 0 and "the prompt's first tokens dropped to 60" in out
    code, out, _ = run("generate", "--attention", "--truncation", "start", "--max-new-tokens", "4", text)
    assert code == 0 and len(out.splitlines()) == 1 + 4  # a line for each token, what it attended to in the kept prompt


def test_the_command_line_client_asks_for_a_priority(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    def queued() -> dict[tuple[str, str], float]:
        return {
            (dict(labels).get("graph", "generate"), dict(labels)["priority"]): n
            for (name, labels), n in metrics(served).items()
            if name in ("attnserve_queue_duration_seconds_count", "attnserve_generate_queue_duration_seconds_count")
        }

    for argv, want in (
        (["encode", "--priority", "low", "hi"], ("encode", "low")),
        (["attention", "--priority", "high", "hi"], ("attention", "high")),
        (["generate", "--priority", "low", "--max-new-tokens", "2", "hi"], ("generate", "low")),
        (["generate", "--stream", "--priority", "high", "--max-new-tokens", "2", "hi"], ("generate", "high")),
        (["encode", "hi"], ("encode", "normal")),
    ):
        before = queued()
        assert client.main(build_parser().parse_args(["client", "--address", served.address, *argv])) == 0
        assert {key for key, n in queued().items() if n > before.get(key, 0)} == {want}, argv
    capsys.readouterr()


def test_tokenize_and_model_info(served: ServerThread) -> None:
    stub = served.stub()
    t = stub.Tokenize(pb.TokenizeRequest(texts=["Good sir", "a"]))
    assert "".join(t.tokenizations[0].tokens) == "Good sir"
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.name == "tiny" and info.execution_provider == "CPUExecutionProvider"
    assert info.num_layers == 2 and info.limits.max_seq_len == 64 and info.build.onnxruntime_version
    assert not info.limits.HasField("client")  # no API keys: no limits of a client's own
    # the default, chosen for the device: a few hundred tokens for each thread the CPU's graphs run on
    assert info.limits.max_batch_tokens == min(CUDA_BATCH_TOKENS, CPU_BATCH_TOKENS * len(os.sched_getaffinity(0)))


def test_metrics_parse_and_move(served: ServerThread) -> None:
    before = metrics(served)
    served.stub().Encode(pb.EncodeRequest(texts=["count me", "and me"]))
    with pytest.raises(grpc.RpcError):
        served.stub().Encode(pb.EncodeRequest())
    after = metrics(served)
    ok = ("attnserve_requests_total", (("code", "OK"), ("rpc", "Encode")))
    bad = ("attnserve_requests_total", (("code", "INVALID_ARGUMENT"), ("rpc", "Encode")))
    why = ("attnserve_errors_total", (("reason", "INVALID_INPUT"), ("rpc", "Encode")))
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert after[why] == before.get(why, 0) + 1  # and why, apart
    tokens = ("attnserve_tokens_total", (("graph", "encode"),))
    assert after[tokens] > before.get(tokens, 0)
    assert after[("attnserve_ready", ())] == 1
    assert after[("attnserve_execution_provider", (("provider", "CPUExecutionProvider"),))] == 1
    names = {n for n, _ in after}
    for name in (
        "attnserve_request_duration_seconds_bucket",
        "attnserve_queue_duration_seconds_bucket",
        "attnserve_compute_duration_seconds_bucket",
        "attnserve_batch_padded_tokens_bucket",
        "attnserve_queue_depth",
        "attnserve_model_info",
    ):
        assert name in names, name


def test_health_is_serving_and_reflection_lists_the_service(served: ServerThread) -> None:
    channel = grpc.insecure_channel(served.address)
    check = health_pb2_grpc.HealthStub(channel).Check
    assert check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert check(health_pb2.HealthCheckRequest(service="attnserve.v1.AttnServe")).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "attnserve.v1.AttnServe" in {s.name for s in reply.list_services_response.service}


def test_health_names_a_service_it_does_not_know_and_those_it_does(served: ServerThread) -> None:
    """A probe configured with a wrong service name is told what is wrong, as every other error is."""
    check = health_pb2_grpc.HealthStub(grpc.insecure_channel(served.address)).Check
    with pytest.raises(grpc.RpcError) as e:
        check(health_pb2.HealthCheckRequest(service="attnserve.v1.AttnServ"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and reason(e.value) == "SERVICE_NOT_FOUND"
    assert e.value.details() == (
        "health: no service 'attnserve.v1.AttnServ' here; it answers for '' (the server as a whole), "
        "attnserve.v1.AttnServe and inference.GRPCInferenceService"
    )
    with pytest.raises(grpc.RpcError) as e:
        check(health_pb2.HealthCheckRequest(service="\u00e9" * 1500), timeout=5)  # said cut short
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details().encode()) < 1024


# --- servers of their own: limits, failures and lifecycle ------------------------------------


def test_queue_full_is_refused_at_once(model_dir: Path) -> None:
    st = ServerThread(config(model_dir, max_queue_size=2, max_queue_delay_ms=1500, max_batch_size=64)).start()
    try:
        stub = st.stub()
        held = [stub.Encode.future(pb.EncodeRequest(texts=[f"waiting {i}"])) for i in range(2)]
        time.sleep(0.3)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(pb.EncodeRequest(texts=["one too many"]))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 0.5
        assert reason(e.value) == "QUEUE_FULL"
        assert metrics(st)[("attnserve_errors_total", (("reason", "QUEUE_FULL"), ("rpc", "Encode")))] == 1
        assert all(f.result().embeddings for f in held)  # the queued ones are still served
    finally:
        st.stop()


def test_a_call_whose_deadline_passes_in_the_queue_never_reaches_the_model(model_dir: Path) -> None:
    """Over gRPC the client's deadline cancels the call on the server at the same moment: the queued text
    leaves the queue at once (counted as cancelled). The batcher's own deadline branch, for a deadline the
    server alone knows, is tested in test_batcher."""
    st = ServerThread(config(model_dir, max_queue_delay_ms=600, max_batch_size=64)).start()
    try:
        stub = st.stub()
        before = metrics(st)
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(pb.EncodeRequest(texts=["too late"]), timeout=0.1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.8)  # past the batch window: the collector has looked at the queue
        after = metrics(st)
        key = ("attnserve_batch_size_count", (("graph", "encode"),))
        assert after.get(key, 0) == before.get(key, 0)  # no batch ran
        cancelled = ("attnserve_dropped_texts_total", (("graph", "encode"), ("reason", "cancelled")))
        assert after[cancelled] == before.get(cancelled, 0) + 1
        assert after[("attnserve_queue_depth", (("graph", "encode"),))] == 0
    finally:
        st.stop()


def test_a_failing_batch_fails_only_its_requests(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """And the client is told an id for the failure, which the server logged with its trace, the
    caller's address and the request's own id, and nothing else of it."""
    st = ServerThread(config(model_dir)).start()
    try:
        fail_first_encode(st)
        with pytest.raises(grpc.RpcError) as e, caplog.at_level(logging.ERROR, "service.servicer"):
            st.stub().Encode(pb.EncodeRequest(texts=["unlucky"]), metadata=[("x-request-id", "req-42")])
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "device" not in e.value.details()  # the detail stays in the log
        error = re.fullmatch(re.escape(INTERNAL_MESSAGE) + r" as error ([0-9a-f]{16})", e.value.details())
        assert error is not None
        # and as the ErrorInfo's errorId, for a client that keeps the reason and its metadata apart
        info = detail(rich(e.value), error_details_pb2.ErrorInfo)
        assert info is not None and info.reason == "INTERNAL_ERROR" and info.metadata["errorId"] == error.group(1)
        (record,) = [r for r in caplog.records if getattr(r, "error_id", None) == error.group(1)]
        assert record.exc_info is not None and "device lost its mind" in str(record.exc_info[1])
        assert (record.rpc, record.request_id) == ("Encode", "req-42")  # type: ignore[attr-defined]
        assert record.peer.startswith("ipv") and error.group(1) in record.getMessage()  # type: ignore[attr-defined]
        assert st.stub().Encode(pb.EncodeRequest(texts=["lucky"])).embeddings
    finally:
        st.stop()


def test_health_waits_for_the_model_and_turns_on_shutdown(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.server

    loaded = concurrent.futures.Future[None]()

    class SlowRuntime(Runtime):
        def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
            loaded.result(30)  # held until the test has looked
            super().__init__(*a, **kw)

    monkeypatch.setattr(service.server, "Runtime", SlowRuntime)
    st = ServerThread(config(model_dir, max_queue_delay_ms=800, max_batch_size=64)).start(wait=False)
    try:
        time.sleep(0.5)
        channel = grpc.insecure_channel(st.address if st.server.port else "127.0.0.1:1")
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            st.stub().Encode(pb.EncodeRequest(texts=["early"]))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and reason(e.value) == "MODEL_LOADING"
        loaded.set_result(None)
        deadline = time.monotonic() + 30
        while check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        in_flight = st.stub().Encode.future(pb.EncodeRequest(texts=["in flight"]))
        time.sleep(0.2)
        stopping = concurrent.futures.ThreadPoolExecutor(1).submit(st.stop, 5.0)
        time.sleep(0.2)
        # the health service itself says NOT_SERVING; the port refuses new calls, a health check included
        status = st.call(st.server.health.Check(health_pb2.HealthCheckRequest(), None))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            st.stub().Encode(pb.EncodeRequest(texts=["too late"]), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert in_flight.result(10).embeddings  # drained, not dropped
        stopping.result(20)
    finally:
        if not loaded.done():
            loaded.set_result(None)
        st.stop()
