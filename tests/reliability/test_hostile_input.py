"""Hostile and careless input: malformed bytes, unnamed enum values, fuzzed messages, huge texts.

Every answer is OK or a client error (never INTERNAL or UNKNOWN), the message says what was
wrong in plain words, and health stays SERVING throughout.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.attnserve.v1 import attnserve_pb2 as pb
from service.guard import PROBE_REQUEST_BYTES
from tests.reliability.conftest import ALLOWED, SERVING, health
from tests.service.conftest import ServerThread, config, outcome, wait_for
from tests.service.test_server import metrics, reason

SERVICE = pb.DESCRIPTOR.services_by_name["AttnServe"]
METHODS = {m.name: m for m in SERVICE.methods}
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")


def raw_call(channel: grpc.Channel, path: str, streaming: bool, data: bytes) -> grpc.StatusCode:
    """Send bytes as they are (no serializer) and read whatever comes back; the status code."""
    try:
        if streaming:
            call = channel.unary_stream(path)(data, timeout=10)
            for _ in call:
                if path.endswith("Watch"):  # Watch never ends by itself: one message is an answer
                    call.cancel()
                    return grpc.StatusCode.OK
        else:
            channel.unary_unary(path)(data, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert "<class" not in (e.details() or ""), e.details()  # no internals in the message
        return e.code()


def every_method() -> list[tuple[str, bool]]:
    ours = [(f"/{SERVICE.full_name}/{m.name}", m.server_streaming) for m in SERVICE.methods]
    return [*ours, (HEALTH_METHODS[0], False), (HEALTH_METHODS[1], True)]


# --- malformed bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"\x00", b"\n\x01\xff", b"\n\xff\xff\xff\xff\x0f", b"\x0a\x05abc", b"\xff" * 64])
def test_malformed_bytes_get_invalid_argument_on_every_method(guarded: ServerThread, data: bytes) -> None:
    channel = grpc.insecure_channel(guarded.address)
    for path, streaming in every_method():
        code = raw_call(channel, path, streaming, data)
        # bytes that happen to parse (an unknown field of an empty message) are a valid request
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK), (path, data, code)
        if path.endswith(("/Encode", "/Tokenize", "/Generate", "/GenerateStream")):  # field 1 is a string
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, data, code)
    assert health(guarded.address) == SERVING


def test_malformed_bytes_name_the_message_they_should_have_been(guarded: ServerThread) -> None:
    channel = grpc.insecure_channel(guarded.address)
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary(f"/{SERVICE.full_name}/Encode")(b"\n\x01\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "request is not a valid attnserve.v1.EncodeRequest message (3 bytes)"


def test_malformed_bytes_to_reflection_get_invalid_argument(guarded: ServerThread) -> None:
    channel = grpc.insecure_channel(guarded.address)
    for version in ("v1", "v1alpha"):
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as e:
            list(call(iter([b"\x00"]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=300), which=st.integers(0, len(every_method()) - 1))
def test_random_bytes_never_get_an_internal_error(guarded: ServerThread, data: bytes, which: int) -> None:
    path, streaming = every_method()[which]
    code = raw_call(grpc.insecure_channel(guarded.address), path, streaming, data)
    assert code in ALLOWED, (path, data, code)


# --- enum values the schema does not name -------------------------------------------------------


ENUM_CASES: list[tuple[str, Message, str]] = [
    ("Encode", pb.EncodeRequest(texts=["hi"], pooling=7), "pooling"),
    ("Encode", pb.EncodeRequest(texts=["hi"], truncation=4), "truncation"),
    ("AttentionMap", pb.AttentionMapRequest(text="hi", truncation=4), "truncation"),
    ("Generate", pb.GenerateRequest(prompt="hi", max_new_tokens=1, truncation=4), "truncation"),
    ("AttentionMap", pb.AttentionMapRequest(text="hi", precision=-1), "precision"),
    ("Encode", pb.EncodeRequest(texts=["hi"], priority=4), "priority"),
    ("AttentionMap", pb.AttentionMapRequest(text="hi", priority=-2), "priority"),
    ("Generate", pb.GenerateRequest(prompt="hi", max_new_tokens=1, priority=99), "priority"),
]


@pytest.mark.parametrize(("rpc", "request_", "field"), ENUM_CASES)
def test_every_enum_field_is_checked_the_same_way(
    guarded: ServerThread, rpc: str, request_: Message, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        getattr(guarded.stub(), rpc)(request_, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: unknown value")


def test_the_enum_cases_cover_every_enum_field_of_every_request() -> None:
    fields = {(m.input_type.name, f.name) for m in SERVICE.methods for f in _enum_fields(m.input_type)}
    covered = {(type(r).DESCRIPTOR.name, f) for _, r, f in ENUM_CASES}
    assert fields == covered


def _enum_fields(d: Descriptor) -> list[FieldDescriptor]:
    return [f for f in d.fields if f.type == FieldDescriptor.TYPE_ENUM]


# --- a property-based fuzzer over every request message -----------------------------------------

SPECIAL_TEXTS = ["", "<|endoftext|>", "\x00", "\ufffd", "é" * 300, "the king " * 300, "🙂" * 50]


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=60), st.sampled_from(SPECIAL_TEXTS))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 5)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64):
        top = 2**32 - 1 if t == FieldDescriptor.TYPE_UINT32 else 2**64 - 1
        return st.one_of(st.integers(0, 80), st.integers(0, top))
    if t == FieldDescriptor.TYPE_MESSAGE:
        return messages(f.message_type)
    raise AssertionError(f"no strategy for {f.full_name} (type {t}): add one")


def _field(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    return st.lists(_scalar(f), max_size=70 if f.name == "texts" else 6) if f.is_repeated else _scalar(f)


def messages(d: Descriptor) -> st.SearchStrategy[Message]:
    """Messages of type d with any subset of its fields set to any values, one member of each oneof at most."""
    cls = pb.__dict__.get(d.name)
    if cls is None:
        raise AssertionError(f"{d.full_name} is not in the API module")
    plain = [f for f in d.fields if f.containing_oneof is None or f.containing_oneof.name.startswith("_")]
    oneofs = [o for o in d.oneofs if not o.name.startswith("_")]  # "_seed": proto3 optional, not a real oneof
    parts = {f.name: st.one_of(st.none(), _field(f)) for f in plain}
    for o in oneofs:
        parts[f"oneof:{o.name}"] = st.one_of(st.none(), st.sampled_from(list(o.fields)).flatmap(
            lambda f: _field(f).map(lambda v, name=f.name: (name, v))))  # fmt: skip

    def build(values: dict[str, Any]) -> Message:
        kw = {k: v for k, v in values.items() if v is not None and not k.startswith("oneof:")}
        for k, v in values.items():
            if k.startswith("oneof:") and v is not None:
                kw[v[0]] = v[1]
        return cls(**kw)

    return st.fixed_dictionaries(parts).map(build)


def _call(stub: Any, method: str, request: Message) -> grpc.StatusCode:
    try:
        if METHODS[method].server_streaming:
            for _ in getattr(stub, method)(request, timeout=30):
                pass
        else:
            getattr(stub, method)(request, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert "<class" not in (e.details() or ""), e.details()
        return e.code()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fuzzed_requests_get_only_client_errors_and_health_stays_serving(guarded: ServerThread, method: str) -> None:
    stub = guarded.stub()
    seen: set[grpc.StatusCode] = set()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=messages(METHODS[method].input_type))
    def check(request: Message) -> None:
        code = _call(stub, method, request)
        assert code in ALLOWED, (request, code)
        seen.add(code)
        assert health(guarded.address, timeout=1.0) == SERVING

    check()
    assert seen  # something was sent and answered


# --- large inputs -------------------------------------------------------------------------------


def test_every_limit_in_force_is_reported(guarded: ServerThread) -> None:
    limits = guarded.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10).limits
    cfg = guarded.server.config
    assert limits.max_new_tokens == cfg.max_new_tokens == 16
    assert (limits.max_text_bytes, limits.max_request_bytes) == (cfg.max_text_bytes, cfg.max_request_bytes)
    assert limits.max_concurrent_calls == cfg.max_concurrent_calls
    assert limits.max_queue_tokens == cfg.max_queue_tokens
    assert limits.max_running_sequences == cfg.max_running_sequences
    assert limits.max_waiting_sequences == cfg.max_waiting_sequences
    assert limits.max_stop_sequences == 8
    assert limits.max_attention_bytes == cfg.max_attention_bytes
    unset = [f.name for f in pb.Limits.DESCRIPTOR.fields if getattr(limits, f.name) == 0]
    assert not unset, f"limits reported as 0: {unset}"


def test_model_info_says_nothing_of_where_the_model_was_made(guarded: ServerThread) -> None:
    info = guarded.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    config = json.loads(info.config_json)
    assert config["model"]["max_seq_len"] == 64 and config["name"] == "tiny"
    assert "/" not in info.config_json  # no paths: not the checkpoint's, not a file name


def test_typed_special_tokens_stay_text(guarded: ServerThread) -> None:
    stub = guarded.stub()
    tok = stub.Tokenize(pb.TokenizeRequest(texts=["a <|endoftext|> b"]), timeout=10).tokenizations[0]
    eot = json.loads(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).config_json)["eot_token_id"]
    assert eot not in tok.ids and "".join(tok.tokens) == "a <|endoftext|> b"


def test_inputs_over_the_byte_limits_are_refused_naming_the_limit(guarded: ServerThread) -> None:
    stub = guarded.stub()
    cfg = guarded.server.config
    big = "x" * (cfg.max_text_bytes + 1)
    cases = [
        (stub.Encode, pb.EncodeRequest(texts=[big]), "texts[0]"),
        (stub.Encode, pb.EncodeRequest(texts=["y" * cfg.max_text_bytes] * 4 + ["zz"]), "texts: more than"),
        (stub.Tokenize, pb.TokenizeRequest(texts=[big]), "texts[0]"),
        (stub.AttentionMap, pb.AttentionMapRequest(text=big), "text"),
        (stub.Generate, pb.GenerateRequest(prompt=big, max_new_tokens=1), "prompt"),
        (stub.Generate, pb.GenerateRequest(prompt="hi", max_new_tokens=1, stop=[big]), "stop[0]"),
    ]
    for method, request, needle in cases:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            method(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith(needle) and "limit" in e.value.details()
        assert time.monotonic() - t0 < 2.0
    # a message far beyond any limit is refused by the transport before it is parsed
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(pb.EncodeRequest(texts=["z" * (4 * cfg.max_request_bytes)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_long_lists_of_bad_values_are_named_in_a_message_that_reaches_the_client(guarded: ServerThread) -> None:
    """A message that echoed every bad value outgrew the trailer it travels in, and the client got
    RESOURCE_EXHAUSTED "Stream removed" instead of the error."""
    stub = guarded.stub()
    many = 100_000
    cases = [
        (
            pb.AttentionMapRequest(text="hi", layers=[999] * many),
            f"layers: [999, 999, 999, 999, 999] and {many - 5} more",
        ),
        (
            pb.AttentionMapRequest(text="hi", heads=list(range(50, 50 + many))),
            f"heads: [50, 51, 52, 53, 54] and {many - 5}",
        ),
        (pb.AttentionMapRequest(text="hi", layers=[1, 0] * (many // 2)), "layers: [0, 1] repeated"),
        (pb.AttentionMapRequest(token_ids=pb.TokenIds(ids=[10**9] * many)), "token_ids.ids: [1000000000,"),
    ]
    for request, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.AttentionMap(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details().startswith(needle), e.value.details()
    assert health(guarded.address) == SERVING


def test_made_up_method_names_leave_nothing_behind(guarded: ServerThread) -> None:
    """The v2 service answers any method name UNIMPLEMENTED; the guard keeps a wrapped handler only
    for the methods the API declares, or a client could grow it by one a name, without bound."""
    channel = grpc.insecure_channel(guarded.address)
    guarded.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)
    kept = guarded.server.guard._handlers
    assert "/attnserve.v1.AttnServe/Encode" in kept  # a declared method keeps its handler
    before = len(kept)
    for i in range(300):
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(f"/inference.GRPCInferenceService/Made{i}")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(kept) == before
    assert health(guarded.address) == SERVING


def test_large_inputs_within_the_limits_are_served_while_health_answers(guarded: ServerThread) -> None:
    """Texts at the byte limit, truncated or tokenized whole, with health checks of a 1 s deadline meanwhile."""
    stub = guarded.stub()
    cfg = guarded.server.config
    per_request = cfg.max_request_bytes // cfg.max_text_bytes
    words = ("the king speaks of the crown and the queen weeps " * (cfg.max_text_bytes // 48))[: cfg.max_text_bytes]
    calls: list[Callable[[], Any]] = [
        lambda: stub.Encode(pb.EncodeRequest(texts=[words] * per_request, truncation=pb.TRUNCATION_END), timeout=30),
        lambda: stub.AttentionMap(pb.AttentionMapRequest(text=words, truncation=pb.TRUNCATION_END), timeout=30),
        lambda: stub.Tokenize(pb.TokenizeRequest(texts=[words]), timeout=30),
    ]
    results = []
    checks = 0
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for call in calls:
            for _ in range(3):
                running = pool.submit(call)
                # at least one health check while each call is in flight, then more until it is done
                while True:
                    assert health(guarded.address, timeout=1.0) == SERVING
                    checks += 1
                    if running.done():
                        break
                results.append(running.result())
    elapsed = time.monotonic() - t0
    assert checks >= 9
    assert all(e.truncated and e.token_count == 64 for e in results[0].embeddings)
    assert results[3].truncated and len(results[3].tokens) == 64
    assert "".join(results[6].tokenizations[0].tokens) == words
    assert elapsed < 30


def test_truncated_prefixes_tokenize_as_the_whole_text_does(guarded: ServerThread) -> None:
    """Only a prefix of a long text is tokenized; its first max_seq_len tokens are those of the whole text."""
    stub = guarded.stub()
    engine = guarded.server.engine
    assert engine is not None
    for text in ["the king speaks " * 2000, "a" * 5000 + " b" * 3000, "é, " * 4000, "x\n\n y " * 3000]:
        assert len(text) > engine.cut_chars
        whole = stub.Tokenize(pb.TokenizeRequest(texts=[text]), timeout=30).tokenizations[0].ids[:64]
        amap = stub.AttentionMap(pb.AttentionMapRequest(text=text, truncation=pb.TRUNCATION_END), timeout=30)
        assert list(amap.token_ids) == list(whole) and amap.truncated


def test_truncated_suffixes_tokenize_as_the_whole_text_does(guarded: ServerThread) -> None:
    """Only a suffix of a long text is tokenized for TRUNCATION_START; its last max_seq_len tokens
    are those of the whole text."""
    stub = guarded.stub()
    engine = guarded.server.engine
    assert engine is not None
    texts = ["the king speaks " * 2000, " b" * 3000 + "a" * 5000, "é, " * 4000, "x\n\n y " * 3000, "a  b   c\t" * 2000]
    for text in texts:
        assert len(text) > engine.cut_chars
        whole = stub.Tokenize(pb.TokenizeRequest(texts=[text]), timeout=30).tokenizations[0].ids[-64:]
        amap = stub.AttentionMap(pb.AttentionMapRequest(text=text, truncation=pb.TRUNCATION_START), timeout=30)
        assert list(amap.token_ids) == list(whole) and amap.truncated


def test_reflection_answers_as_v1_and_v1alpha(guarded: ServerThread) -> None:
    channel = grpc.insecure_channel(guarded.address)
    for version in ("v1", "v1alpha"):
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        listed = next(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"attnserve.v1.AttnServe", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
        described = next(
            call(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol=f"grpc.reflection.{version}.ServerReflection"
                        )
                    ]
                ),
                timeout=10,
            )
        )
        assert described.file_descriptor_response.file_descriptor_proto, version


def test_health_is_never_refused_for_load(guarded: ServerThread) -> None:
    guard = guarded.server.guard
    bound = guard.max_concurrent
    guard.max_concurrent = 0  # every call of the model's service is now over the bound
    try:
        with pytest.raises(grpc.RpcError) as e:
            guarded.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health(guarded.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        guard.max_concurrent = bound


def test_health_and_reflection_streams_are_bounded_and_check_is_still_answered(model_dir: Path) -> None:
    """A Watch or reflection stream stays open for as long as its client keeps it, and holds memory
    meanwhile (~20 KB each in the server: 3,400 Watches took 71 MB), so they are bounded apart from
    the model's calls."""
    st = ServerThread(config(model_dir, max_probe_streams=3)).start()
    channel = grpc.insecure_channel(st.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch
    try:
        open_ = [watch(health_pb2.HealthCheckRequest()) for _ in range(3)]
        assert all(next(w).status == health_pb2.HealthCheckResponse.SERVING for w in open_)
        with pytest.raises(grpc.RpcError) as e:
            next(watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Check" in e.value.details()
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        with pytest.raises(grpc.RpcError) as e:
            list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health(st.address) == SERVING  # Check, whatever streams are open
        served = st.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)  # and the model's calls
        assert len(served.embeddings) == 1
        open_.pop().cancel()  # a stream that ends gives its place back
        deadline = time.monotonic() + 10
        while st.server.guard.streams_open > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert next(watch(health_pb2.HealthCheckRequest(), timeout=10)).status == health_pb2.HealthCheckResponse.SERVING
        for w in open_:
            w.cancel()
    finally:
        st.stop()


def test_health_and_reflection_requests_are_bounded_in_bytes(guarded: ServerThread) -> None:
    """A Watch holds its request for as long as it is open: 200 naming 1 MB services held 0.6 GB of
    the server's memory. Their requests are bounded apart from the model's (1 MiB)."""
    channel = grpc.insecure_channel(guarded.address)
    health_stub = health_pb2_grpc.HealthStub(channel)
    long_name = health_pb2.HealthCheckRequest(service="x" * (PROBE_REQUEST_BYTES + 1))
    for ask in (health_stub.Check, lambda r, timeout: next(health_stub.Watch(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as e:
            ask(long_name, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"grpc.health.v1.HealthCheckRequest is at most {PROBE_REQUEST_BYTES} bytes" in e.value.details()
        assert reason(e.value) == "REQUEST_TOO_LARGE"
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    with pytest.raises(grpc.RpcError) as e:
        list(reflect(iter([reflection_pb2.ServerReflectionRequest(file_by_filename="f" * 5000)]), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_for(lambda: guarded.server.guard.streams_open == 0)  # the refused streams give their places back
    named = health_pb2.HealthCheckRequest(service="attnserve.v1.AttnServe")  # a name as services have them
    assert health_stub.Check(named, timeout=10).status == SERVING
    assert health(guarded.address) == SERVING


def test_a_burst_of_attention_maps_is_bounded_in_bytes(model_dir: Path) -> None:
    """Maps being computed or sent are held several times over (array, bytes, message); past the
    budget a call is refused at once, one always passes, and every map's bytes come back."""
    st = ServerThread(config(model_dir, max_attention_bytes=1)).start()
    try:
        stub = st.stub()
        request = pb.AttentionMapRequest(text="the king speaks to the court " * 20, truncation=pb.TRUNCATION_END)
        calls = [stub.AttentionMap.future(request, timeout=30) for _ in range(32)]
        outcomes = [outcome(call) for call in calls]
        for code, details in outcomes:
            assert code == grpc.StatusCode.OK or (
                code == grpc.StatusCode.RESOURCE_EXHAUSTED and "attention maps" in details
            )
        codes = [code for code, _ in outcomes]
        assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        why = ("attnserve_errors_total", (("reason", "ATTENTION_BYTES_AT_LIMIT"), ("rpc", "AttentionMap")))
        assert metrics(st)[why] == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)  # each refusal, and why
        budget = st.server.servicer.attention_budget
        deadline = time.monotonic() + 5
        while budget.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert budget.held == 0
        assert len(stub.AttentionMap(request, timeout=10).probabilities) > 0  # and the next call is served
    finally:
        st.stop()
