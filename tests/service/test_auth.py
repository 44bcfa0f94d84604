"""API keys (``api_keys_file``): the model's calls need one, probes never do, and a call without one
takes no place in the server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.timing import start_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service import client
from service.cli import build_parser
from service.config import ServerConfig, read_keys_file
from service.guard import ClientLimits
from tests.reliability.test_http2 import Peer, framed
from tests.service.conftest import ServerThread, config, fail_first_encode, mount_secret, wait_for
from tests.service.test_server import detail, metrics, reason, rich

KEYS = "# rotated monthly\n\n  old-key-0123456789  \nnew-key-9876543210\n"


@pytest.fixture(scope="module")
def keyed(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(KEYS)
    st = ServerThread(config(model_dir, api_keys_file=keys)).start()
    yield st
    st.stop()


def calls(address: str, metadata: list[tuple[str, str]]) -> dict[str, Any]:
    """One call of each kind the model serves (unary and streaming, native and v2), with ``metadata``;
    what each returned, or its RpcError."""
    ch = grpc.insecure_channel(address)
    stub, v2_stub = pb_grpc.AttnServeStub(ch), v2_grpc.GRPCInferenceServiceStub(ch)
    text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"the king")
    infer = v2.ModelInferRequest(model_name="attnserve-encode", inputs=[text])
    made = {
        "Encode": lambda: stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=metadata, timeout=30),
        "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=30),
        "GenerateStream": lambda: list(
            stub.GenerateStream(pb.GenerateRequest(prompt="My lord", max_new_tokens=2), metadata=metadata, timeout=30)
        ),
        "ModelInfer": lambda: v2_stub.ModelInfer(infer, metadata=metadata, timeout=30),
        "ModelStreamInfer": lambda: list(v2_stub.ModelStreamInfer(iter([infer]), metadata=metadata, timeout=30)),
    }
    answers: dict[str, Any] = {}
    for name, call in made.items():
        try:
            answers[name] = call()
        except grpc.RpcError as e:
            answers[name] = e
    return answers


@pytest.mark.parametrize(
    ("metadata", "says", "why"),
    [
        ([], "this server needs an API key", "API_KEY_MISSING"),
        ([("authorization", "Bearer not-a-key")], "not one this server accepts", "API_KEY_INVALID"),
        ([("authorization", "Bearer old-key-012345678")], "not one this server accepts", "API_KEY_INVALID"),  # a prefix
        ([("authorization", "Basic old-key-0123456789")], "scheme is not Bearer", "API_KEY_MISSING"),
        ([("x-api-key", "old-key-0123456789")], "this server needs an API key", "API_KEY_MISSING"),
    ],
    ids=["none", "wrong", "a prefix", "another scheme", "another header"],
)
def test_a_call_without_a_key_it_accepts_is_unauthenticated(
    keyed: ServerThread, metadata: list[tuple[str, str]], says: str, why: str
) -> None:
    before = metrics(keyed).get(("attnserve_requests_total", (("code", "UNAUTHENTICATED"), ("rpc", "Encode"))), 0)
    for name, answer in calls(keyed.address, metadata).items():
        assert isinstance(answer, grpc.RpcError), name
        assert answer.code() == grpc.StatusCode.UNAUTHENTICATED and says in (answer.details() or ""), name
        assert reason(answer) == why, name  # a key sent and refused, or none sent as this server takes one
        assert "old-key" not in (answer.details() or "")  # no key is ever echoed
    after = metrics(keyed)[("attnserve_requests_total", (("code", "UNAUTHENTICATED"), ("rpc", "Encode")))]
    assert after == before + 1
    assert keyed.server.guard.in_flight == 0  # refused before it counted against any bound


@pytest.mark.parametrize(
    "header", ["Bearer old-key-0123456789", "bearer new-key-9876543210", "BEARER  new-key-9876543210 "]
)
def test_either_key_in_the_file_is_accepted(keyed: ServerThread, header: str) -> None:
    """Two keys at once, so that one can replace the other with no moment when neither works."""
    answers = calls(keyed.address, [("authorization", header)])
    assert not [name for name, a in answers.items() if isinstance(a, grpc.RpcError)], answers
    assert len(answers["Encode"].embeddings) == 1 and answers["GetModelInfo"].name
    assert not any(r.error_message for r in answers["ModelStreamInfer"])


def test_probes_need_no_key(keyed: ServerThread) -> None:
    """Kubernetes' probes, load balancers' health checks and grpcurl's listing carry no key."""
    ch = grpc.insecure_channel(keyed.address)
    health = health_pb2_grpc.HealthStub(ch)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    watched = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watched).status == health_pb2.HealthCheckResponse.SERVING
    watched.cancel()
    v2_stub = v2_grpc.GRPCInferenceServiceStub(ch)
    assert v2_stub.ServerLive(v2.ServerLiveRequest(), timeout=10).live
    assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    assert v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="attnserve-encode"), timeout=10).name
    reflect = ch.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    listed = next(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert "attnserve.v1.AttnServe" in {s.name for s in listed.list_services_response.service}


def test_the_command_line_client_sends_its_key(
    keyed: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> tuple[int, str, str]:
        code = client.main(build_parser().parse_args(["client", "--address", keyed.address, *argv]))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = run("encode", "hi")
    assert code == 1 and "UNAUTHENTICATED" in err
    code, out, _ = run("--api-key", "new-key-9876543210", "encode", "hi")
    assert code == 0 and "32 dims" in out
    monkeypatch.setenv("ATTNSERVE_CLIENT_API_KEY", "old-key-0123456789")  # kept out of the process list
    code, out, _ = run("info")
    assert code == 0 and '"name": "tiny"' in out
    monkeypatch.delenv("ATTNSERVE_CLIENT_API_KEY")
    assert run("health")[0] == 0  # a container's health check needs none


def test_the_keys_file_is_checked_at_start(model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    with pytest.raises(ValueError, match=r"api_keys_file: cannot read .*keys: No such file"):
        ServerConfig(api_keys_file=path)
    path.write_text("# none yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        ServerConfig(api_keys_file=path)
    path.write_text("good-key\nsecret with spaces\n")
    with pytest.raises(ValueError, match="line 2 is not a key") as e:
        ServerConfig(api_keys_file=path)
    assert "secret" not in str(e.value)  # a key is never repeated in a message or a log
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        ServerConfig(api_keys_file=path)
    path.write_bytes(b"k" * (1024 * 1024 + 1))  # a file of keys holds a few: not read whole
    with pytest.raises(ValueError, match="is over 1048576 bytes"):
        ServerConfig(api_keys_file=path)
    path.write_text("alice key-1\nalice key-2 sekrit\n")  # three words: neither a key nor a name and a key
    with pytest.raises(ValueError, match="line 2 is not a key, or a client's name and a key") as e:
        ServerConfig(api_keys_file=path)
    assert "sekrit" not in str(e.value)  # (a secret with a space in it, maybe)
    path.write_text("al/ice key-1\n")
    with pytest.raises(ValueError, match=re.escape("line 1: a client's name is 1-64 of A-Z a-z 0-9 . _ -")):
        ServerConfig(api_keys_file=path)
    path.write_text("alice key-1\n# bob's\nbob key-1\n")
    with pytest.raises(ValueError, match="line 3 repeats the key of line 1") as e:
        ServerConfig(api_keys_file=path)
    assert "key-1" not in str(e.value)
    path.write_text("alice key-1\nalice key-2\n  key-3  \n")  # one client's old and new; a key with no name
    assert ServerConfig(api_keys_file=path).api_keys == {"key-1": "alice", "key-2": "alice", "key-3": ""}
    path.write_text("good-key\n")
    assert ServerConfig(api_keys_file=path).api_keys == {"good-key": ""}
    with pytest.raises(ValueError, match="api_keys_reload_seconds must be >= 0"):
        ServerConfig(api_keys_file=path, api_keys_reload_seconds=-1)
    assert ServerConfig().api_keys is None
    with caplog.at_level(logging.INFO, "service.server"):
        st = ServerThread(config(model_dir, api_keys_file=path)).start()
        st.stop()
    said = [r.getMessage() for r in caplog.records]
    assert any("need one of 1 API key(s)" in m for m in said)
    assert any("without TLS travel in the clear" in m for m in said)  # without TLS: said at start
    assert not any("good-key" in m for m in said)


@pytest.mark.parametrize(
    "value",
    [b"Bearer new-key-\xe9", b"Bearer \xff\xfe", b"Bearer new\x01key", b"", b"Bearer", b"Bearer " + b"k" * 7000],
    ids=["latin-1", "not UTF-8", "a control character", "empty", "no key", "7 KB"],
)
def test_authorization_bytes_no_client_library_sends_are_unauthenticated(keyed: ServerThread, value: bytes) -> None:
    """Header values as a peer speaking HTTP/2 itself may send them: a client error, never INTERNAL."""
    peer = Peer(keyed.address)
    try:
        sid = peer.h2.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/attnserve.v1.AttnServe/Encode"),
                   (b":authority", b"attnserve"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                   (b"authorization", value)]  # fmt: skip
        peer.h2.send_headers(sid, headers)
        peer.h2.send_data(sid, framed(pb.EncodeRequest(texts=["hi"]).SerializeToString()), end_stream=True)
        peer._flush()
        code, _ = peer.answered({sid})[sid]
    finally:
        peer.close()
    assert code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert peer.reasons[sid] in ("API_KEY_MISSING", "API_KEY_INVALID")


def test_a_key_may_be_given_as_its_sha256(model_dir: Path, tmp_path: Path) -> None:
    """The keys file (a Secret, and every copy of it) need not hold a key a client could use: a line
    may give the key's SHA-256 instead, which the server compares, in constant time, with the SHA-256
    of the key a call carries."""
    digest = hashlib.sha256(b"plain-key-0123").hexdigest()
    path = tmp_path / "keys"
    path.write_text(f"alice sha256:{digest.upper()}\nbob other-key-456\n")  # as sha256sum prints it, or not
    st = ServerThread(config(model_dir, api_keys_file=path)).start()
    try:
        assert works(st.address, "plain-key-0123") and works(st.address, "other-key-456")
        assert not works(st.address, f"sha256:{digest}")  # the digest is not the key
        assert not works(st.address, "plain-key-012")
        m = metrics(st)
        assert m[("attnserve_client_calls_total", (("client", "alice"), ("rpc", "Encode")))] == 1  # under its name
        assert m[("attnserve_api_keys", ())] == 2
    finally:
        st.stop()
    path.write_text(f"alice sha256:{digest[:-1]}\n")
    with pytest.raises(ValueError, match="line 1: a key given as its SHA-256 is sha256: and 64 hex digits"):
        ServerConfig(api_keys_file=path)
    path.write_text(f"alice plain-key-0123\nbob sha256:{digest}\n")
    with pytest.raises(ValueError, match="lines 1 and 2 hold one key, as itself and as its SHA-256") as e:
        ServerConfig(api_keys_file=path)
    assert "plain-key" not in str(e.value)


# --- keys read again as the file changes ---------------------------------------------------------


def mounted(directory: Path, text: str) -> Path:
    """The keys file as Kubernetes mounts a Secret's key (``mount_secret``); the path the server reads."""
    mount_secret(directory, {"keys": text.encode()})
    return directory / "keys"


def works(address: str, key: str) -> bool:
    """Whether an Encode with ``key`` is served (False: UNAUTHENTICATED)."""
    try:
        pb_grpc.AttnServeStub(grpc.insecure_channel(address)).Encode(
            pb.EncodeRequest(texts=["hi"]), metadata=[("authorization", f"Bearer {key}")], timeout=30
        )
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        return False
    return True


def test_keys_are_taken_as_the_mounted_file_changes(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation as an operator makes it on a Secret: add the new key, move clients to it, retire
    the old one; no restart. A file that goes bad meanwhile leaves the keys before in place."""
    path = mounted(tmp_path, "old-key\n")
    st = ServerThread(config(model_dir, api_keys_file=path, api_keys_reload_seconds=0.05)).start()
    caplog.set_level(logging.INFO, "service.server")
    try:

        def gauges() -> tuple[float, float]:
            m = metrics(st)
            return m[("attnserve_api_keys", ())], m[("attnserve_api_keys_file_rejected", ())]

        assert works(st.address, "old-key") and not works(st.address, "new-key") and gauges() == (1, 0)
        mounted(tmp_path, "old-key\nnew-key\n")
        assert wait_for(lambda: works(st.address, "new-key"))
        assert works(st.address, "old-key") and gauges() == (2, 0)
        mounted(tmp_path, "new-key\n")
        assert wait_for(lambda: not works(st.address, "old-key"))
        assert works(st.address, "new-key") and gauges() == (1, 0)
        said = [r.getMessage() for r in caplog.records]
        assert any("2 key(s) now, 1 added, 0 retired" in m for m in said)
        assert any("1 key(s) now, 0 added, 1 retired" in m for m in said)

        # gone bad: an edit that left no key, then a line that is not one; the keys before stay
        caplog.clear()
        mounted(tmp_path, "# emptied by mistake\n")
        assert wait_for(lambda: gauges()[1] == 1)
        time.sleep(0.3)  # several looks at the same bad file: said once
        mounted(tmp_path, "new-key\nanother bad secret\n")
        assert wait_for(lambda: sum("line 2 is not a key" in r.getMessage() for r in caplog.records) == 1)
        time.sleep(0.3)
        assert works(st.address, "new-key") and not works(st.address, "old-key") and gauges() == (1, 1)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2, errors
        assert "holds no key; the 1 API key(s) read before are still accepted" in errors[0]
        assert not any("secret" in m for m in errors)  # no key repeated, even a bad one
        (tmp_path / "..data").unlink()  # gone altogether
        assert wait_for(lambda: any("cannot read" in r.getMessage() for r in caplog.records))
        assert works(st.address, "new-key")
        mounted(tmp_path, "third-key\n")
        assert wait_for(lambda: gauges() == (1, 0))
        assert works(st.address, "third-key") and not works(st.address, "new-key")
    finally:
        st.stop()


def test_sighup_reads_the_keys_file_again_and_the_server_goes_on(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("old-key\n")
    proc, port = start_server(model_dir, "--api-keys-file", str(path), "--api-keys-reload-seconds", "0")
    address = f"127.0.0.1:{port}"
    try:
        assert works(address, "old-key")
        path.write_text("new-key\n")
        time.sleep(0.5)
        assert works(address, "old-key") and not works(address, "new-key")  # not looked at: only on SIGHUP
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: works(address, "new-key"))
        assert not works(address, "old-key")
        proc.send_signal(signal.SIGHUP)  # unchanged: said so, and still serving
        time.sleep(0.3)
        assert proc.poll() is None and works(address, "new-key")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "API keys read again" in err and "1 key(s) now, 1 added, 1 retired" in err
    assert "unchanged, 1 key(s)" in err and "new-key" not in err


def test_sighup_without_a_keys_file_is_said_and_ends_nothing(
    served: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "service.server"):
        served.call(served.server.reload_api_keys(asked=True))
    assert any("no API keys file to read again" in r.getMessage() for r in caplog.records)


def test_each_call_is_counted_and_logged_under_the_client_its_key_names(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text("alice key-a1\nalice key-a2\nbob key-b\nkey-c\n")
    st = ServerThread(config(model_dir, api_keys_file=path, access_log=True)).start()
    caplog.set_level(logging.INFO, "attnserve.access")
    try:
        for key in ("key-a1", "key-a2", "key-b", "key-c", "key-a1"):
            assert works(st.address, key)
        assert not works(st.address, "key-d")
        m = metrics(st)
        fail_first_encode(st)
        with pytest.raises(grpc.RpcError) as e:
            st.stub().Encode(pb.EncodeRequest(texts=["hi"]), metadata=[("authorization", "Bearer key-b")], timeout=30)
        assert e.value.code() == grpc.StatusCode.INTERNAL
    finally:
        st.stop()
    (failed,) = [r for r in caplog.records if r.name == "service.servicer" and r.levelno == logging.ERROR]
    assert failed.client == "bob"  # type: ignore[attr-defined]

    def counted(client: str) -> float:
        return m.get(("attnserve_client_calls_total", (("client", client), ("rpc", "Encode"))), 0)

    assert (counted("alice"), counted("bob"), counted("unnamed")) == (3, 1, 1)
    records = [r for r in caplog.records if r.name == "attnserve.access"]
    seen = [(r.code, getattr(r, "client", None)) for r in records]  # type: ignore[attr-defined]
    assert seen == [("OK", "alice"), ("OK", "alice"), ("OK", "bob"), ("OK", "unnamed"), ("OK", "alice"),
                    ("UNAUTHENTICATED", None), ("INTERNAL", "bob")]  # fmt: skip
    assert records[2].getMessage().endswith(" client=bob")


def test_a_client_at_its_limit_is_refused_while_others_are_served(model_dir: Path, tmp_path: Path) -> None:
    """max_calls_per_client: one client's calls (here, opened and left with nothing sent, as a stuck
    or hostile client leaves them) hold at most that many places; past it, that client is refused
    and the others are served."""
    path = tmp_path / "keys"
    path.write_text("alice key-a\nbob key-b\n")
    st = ServerThread(config(model_dir, api_keys_file=path, max_calls_per_client=2, max_concurrent_calls=8)).start()
    st.server.guard.stalled_seconds = 60.0  # the held calls are not to give way here (the next test)
    peer = Peer(st.address)
    try:
        alice = (("authorization", "Bearer key-a"),)
        for _ in range(2):
            peer.open("/attnserve.v1.AttnServe/Encode", metadata=alice)
        assert wait_for(lambda: st.server.guard.in_flight == 2)
        gauge = ("attnserve_client_calls_in_progress", (("client", "alice"),))
        limited = ("attnserve_client_calls_limited_total", (("client", "alice"), ("limit", "in_progress")))
        assert metrics(st)[gauge] == 2 and metrics(st)[limited] == 0  # at 0 from the client's first call
        with pytest.raises(grpc.RpcError) as e:
            st.stub().Encode(pb.EncodeRequest(texts=["hi"]), metadata=list(alice), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client alice has 2 calls in progress, its limit" in (e.value.details() or "")
        assert reason(e.value) == "CLIENT_CALLS_IN_PROGRESS"
        assert metrics(st)[limited] == 1
        assert works(st.address, "key-b")  # another client is served
        peer.close()  # alice's held calls end with their connection
        assert wait_for(lambda: st.server.guard.in_flight == 0)
        assert metrics(st)[gauge] == 0 and st.server.guard.by_client == {"alice": 0, "bob": 0}
        answers = calls(st.address, list(alice))  # each kind of call, unary and streamed, leaves as it came
        assert not [a for a in answers.values() if isinstance(a, grpc.RpcError)], answers
        assert wait_for(lambda: st.server.guard.by_client["alice"] == 0) and metrics(st)[gauge] == 0
    finally:
        peer.close()
        st.stop()
    with pytest.raises(ValueError, match="max_calls_per_client needs api_keys_file"):
        ServerConfig(max_calls_per_client=4)


def test_at_its_limit_a_clients_own_stalled_call_or_idle_stream_gives_way_to_its_new_call(
    model_dir: Path, tmp_path: Path
) -> None:
    """A client's own calls waiting for their requests, or its own v2 streams with no request in
    progress (tritonclient keeps one open for good), held its places of max_calls_per_client: a
    tenant whose workers each kept a stream open could make no other call. At its limit, its call
    stalled longest for its request, or else its stream idle longest (once a second), is ended
    RESOURCE_EXHAUSTED to make room for its new one; another client's are never touched."""
    path = tmp_path / "keys"
    path.write_text("alice key-a\nbob key-b\n")
    st = ServerThread(config(model_dir, api_keys_file=path, max_calls_per_client=2, max_concurrent_calls=8)).start()
    guard = st.server.guard
    alice, bob = [("authorization", "Bearer key-a")], [("authorization", "Bearer key-b")]
    text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"the king")
    infer = v2.ModelInferRequest(model_name="attnserve-encode", inputs=[text])
    v2_stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address))
    outgoing: dict[str, Any] = {}
    peer = Peer(st.address)
    try:
        # bob's idle stream first: the oldest on the server, and not alice's to end
        for name, key in (("bob", bob), ("alice 1", alice), ("alice 2", alice)):
            outgoing[name] = queue.Queue()
            stream = v2_stub.ModelStreamInfer(iter(outgoing[name].get, None), metadata=key, timeout=60)
            outgoing[name].put(infer)
            assert not next(stream).error_message  # served, then idle
            outgoing[name + " stream"] = stream
        assert guard.by_client == {"bob": 1, "alice": 2}
        time.sleep(guard.stalled_seconds + 0.2)
        limited = ("attnserve_client_calls_limited_total", (("client", "alice"), ("limit", "in_progress")))
        assert len(st.stub().Encode(pb.EncodeRequest(texts=["hi"]), metadata=alice, timeout=10).embeddings) == 1
        with pytest.raises(grpc.RpcError) as e:  # alice's stream idle longest made room
            next(outgoing["alice 1 stream"])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e.value) == "IDLE_STREAM"
        assert "client alice has 2 calls in progress, its limit; this stream had no request" in e.value.details()
        for name in ("bob", "alice 2"):  # the others go on
            outgoing[name].put(infer)
            assert not next(outgoing[name + " stream"]).error_message
        assert metrics(st).get(limited, 0) == 0  # nothing was refused
        # a call of alice's opened with nothing sent, stalled: it gives way before her idle stream
        held = peer.open("/attnserve.v1.AttnServe/Encode", metadata=tuple(alice))
        assert wait_for(lambda: guard.by_client["alice"] == 2)
        time.sleep(guard.stalled_seconds + 0.2)
        assert len(st.stub().Encode(pb.EncodeRequest(texts=["hi"]), metadata=alice, timeout=10).embeddings) == 1
        code, message = peer.answered({held})[held]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "waited longest for its request" in message
        assert peer.reasons[held] == "REQUEST_NOT_SENT"
        outgoing["alice 2"].put(infer)
        assert not next(outgoing["alice 2 stream"]).error_message
    finally:
        peer.close()
        for name in ("bob", "alice 1", "alice 2"):
            if name in outgoing:
                outgoing[name].put(None)
        st.stop()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("alice key-a rate=5\n", "line 1: a client's limits are max_calls, calls_per_second, burst, tokens_per_second"),
        ("alice key-a max_calls=1.5\n", "line 1: max_calls is a whole number >= 0"),
        ("alice key-a calls_per_second=-1\n", "line 1: calls_per_second is a number >= 0"),
        ("alice key-a tokens_per_second=nan\n", "line 1: tokens_per_second is a number >= 0"),
        ("alice key-a burst=5\n", "alice's burst needs its calls_per_second"),
        ("alice key-a max_calls=2\nalice key-b max_calls=3\n", "line 2: alice's max_calls is not line 1's"),
        ("key-a max_calls=2\n", "line 1: limits are a named client's"),
        ("alice key-a priority=urgent\n", "line 1: priority is high, normal, low"),
        ("alice key-a priority=1\n", "line 1: priority is high, normal, low"),
        ("alice key-a priority=low\nalice key-b priority=high\n", "line 2: alice's priority is not line 1's"),
    ],
)
def test_a_clients_own_limits_in_the_keys_file_are_checked(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(says)) as e:
        ServerConfig(api_keys_file=path)
    assert "key-a" not in str(e.value)


def test_each_client_may_have_limits_of_its_own_and_they_change_with_the_file(model_dir: Path, tmp_path: Path) -> None:
    """Tiers without a restart: a line of the keys file may set its client's limits in place of the
    server's (``alice key-a calls_per_second=...``; 0, none), and they change as the file does."""
    path = tmp_path / "keys"
    path.write_text(
        "alice key-a\nbatch key-b calls_per_second=0\ncarol key-c calls_per_second=0.5 burst=3\ndave key-d\n"
    )
    st = ServerThread(config(model_dir, api_keys_file=path, client_calls_per_second=0.2, client_burst=1)).start()
    stub = st.stub()

    def served(key: str, n: int) -> int:
        """Of n Encodes with ``key`` at once, how many were served (the others refused for their rate)."""
        got = 0
        for _ in range(n):
            try:
                stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=[("authorization", f"Bearer {key}")], timeout=30)
                got += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e) == "CLIENT_CALL_RATE"
        return got

    def own(key: str) -> tuple[object, ...]:
        """The limits GetModelInfo tells the client whose key it carries."""
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=30)
        c = info.limits.client
        return c.client, c.max_calls, round(c.calls_per_second, 6), c.burst, c.tokens_per_second, c.token_burst

    try:
        # each client can ask what it may use (a call like any other, taken from its bucket)
        assert own("key-d") == ("dave", 0, 0.2, 1, 0.0, 0)  # the server's
        assert own("key-b") == ("batch", 0, 0.0, 0, 0.0, 0)
        assert own("key-c") == ("carol", 0, 0.5, 3, 0.0, 0)
        assert served("key-a", 3) == 1  # the server's: a burst of 1
        assert served("key-b", 10) == 10  # none of its own
        assert served("key-c", 5) == 2  # its own burst of 3, one taken by its question
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=[("authorization", "Bearer key-a")], timeout=30)
        assert "client alice is over its rate of 0.2 calls a second (a burst of 1)" in (e.value.details() or "")
        m = metrics(st)
        limited = {labels: n for (name, labels), n in m.items() if name == "attnserve_client_calls_limited_total"}
        assert limited == {  # a series for each limit each client has: batch has none
            (("client", "alice"), ("limit", "rate")): 3,
            (("client", "carol"), ("limit", "rate")): 3,
            (("client", "dave"), ("limit", "rate")): 0,
        }
        has = {labels: n for (name, labels), n in m.items() if name == "attnserve_client_limit"}
        assert has == {  # what each has, beside what it used
            (("client", "alice"), ("limit", "rate")): 0.2,
            (("client", "carol"), ("limit", "rate")): 0.5,
            (("client", "dave"), ("limit", "rate")): 0.2,
        }
        # batch goes on its own bucket of 2; the file changes, and a reload takes it
        path.write_text(
            "alice key-a\nbatch key-b calls_per_second=0.2 burst=2\ncarol key-c calls_per_second=0.5 burst=3\n"
        )
        st.call(st.server.reload_api_keys(asked=True))
        assert own("key-b") == ("batch", 0, 0.2, 2, 0.0, 0)
        assert served("key-b", 4) == 1  # a bucket of 2, one taken by its question
        assert served("key-a", 1) == 0  # alice's bucket is as it was
    finally:
        st.stop()


def test_a_clients_priority_in_the_keys_file_is_its_calls_default_and_the_highest_they_get(
    model_dir: Path, tmp_path: Path
) -> None:
    """A tier of work: ``batch key-b priority=low`` puts all of batch's work behind everyone else's,
    whatever priority its calls ask for; a client whose line sets none gets the one it asks for."""
    path = tmp_path / "keys"
    path.write_text("batch key-b priority=low\nweb key-w priority=high\nalice key-a\n")
    st = ServerThread(config(model_dir, api_keys_file=path)).start()
    stub = st.stub()

    def key(k: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {k}")]

    def served_at(call: Callable[[], object], graph: str = "encode") -> str:
        """The priority whose queue the call's work waited in, as the metrics count it."""
        generation = graph == "generate"
        name = f"attnserve_{'generate_' if generation else ''}queue_duration_seconds_count"
        before = metrics(st)
        call()
        grew = [
            dict(labels)["priority"]
            for (n, labels), v in metrics(st).items()
            if n == name and dict(labels).get("graph", graph) == graph and v > before.get((n, labels), 0)
        ]
        assert len(grew) == 1, grew
        return grew[0]

    def encode(k: str, priority: int) -> Callable[[], object]:
        return lambda: stub.Encode(pb.EncodeRequest(texts=["hi"], priority=priority), metadata=key(k), timeout=30)

    try:
        for k, want in (("key-b", pb.PRIORITY_LOW), ("key-w", pb.PRIORITY_HIGH), ("key-a", pb.PRIORITY_UNSPECIFIED)):
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=key(k), timeout=30)
            assert info.limits.client.priority == want
        assert served_at(encode("key-b", pb.PRIORITY_HIGH)) == "low"  # asked higher: served at its own
        assert served_at(encode("key-b", pb.PRIORITY_UNSPECIFIED)) == "low"
        assert served_at(encode("key-w", pb.PRIORITY_UNSPECIFIED)) == "high"
        assert served_at(encode("key-w", pb.PRIORITY_LOW)) == "low"  # asked lower: served lower
        assert served_at(encode("key-a", pb.PRIORITY_HIGH)) == "high"
        assert served_at(encode("key-a", pb.PRIORITY_UNSPECIFIED)) == "normal"
        attention = pb.AttentionMapRequest(text="hi", priority=pb.PRIORITY_HIGH)
        assert served_at(lambda: stub.AttentionMap(attention, metadata=key("key-b"), timeout=30), "attention") == "low"
        generate = pb.GenerateRequest(prompt="The king", max_new_tokens=2, priority=pb.PRIORITY_HIGH)
        assert served_at(lambda: stub.Generate(generate, metadata=key("key-b"), timeout=30), "generate") == "low"
        # a v2 request's priority parameter, likewise
        request = v2.ModelInferRequest(model_name="attnserve-encode")
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
        request.parameters["priority"].uint64_param = 1
        infer = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address)).ModelInfer
        assert served_at(lambda: infer(request, metadata=key("key-b"), timeout=30)) == "low"
        assert served_at(lambda: infer(request, metadata=key("key-a"), timeout=30)) == "high"
    finally:
        st.stop()


SECRET = "s3cr3t-Key_0"  # in the place of a key on the fuzzer's lines; no message may repeat it
WORD = st.text(st.characters(codec="utf-8"), max_size=6)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["", "alice", "bob", "#"]) | st.from_regex(r"\S{1,6}", fullmatch=True),  # a name, or none
            st.sampled_from([SECRET, SECRET + "=", "max_calls=1"]) | WORD,  # the key
            st.lists(
                st.sampled_from(["max_calls=2", "burst=1", "calls_per_second=0.5", "token_burst=9", "priority=low"])
                | st.from_regex(r"[a-z_]{1,12}=[-0-9.e]{0,6}", fullmatch=True)
                | WORD,
                max_size=3,
            ),
        ),
        max_size=6,
    )
)
def test_any_keys_file_is_taken_or_refused_with_a_message_that_repeats_no_key(
    lines: list[tuple[str, str, list[str]]],
) -> None:
    """Whatever a keys file holds, it is read or refused with a ValueError, never another exception,
    and the message never repeats a key. (A line's first word is its client's name where more follow,
    so a key stands alone where it has no name.)"""
    text = "\n".join(" ".join([name, key, *limits] if name else [key]) for name, key, limits in lines)
    try:
        keys, limits = read_keys_file(Path("keys"), text.encode())
    except ValueError as e:
        assert SECRET not in str(e)
    else:
        assert keys and all(v >= 0 for own in limits.values() for v in own.values())


def test_a_clients_own_limits_take_the_place_of_the_servers_each_alone() -> None:
    server = ClientLimits(max_calls=0, rate=0.2, burst=1, token_rate=0.0, token_burst=1)
    assert server.given({}) == server and server.kinds() == ("rate",)
    own = server.given({"max_calls": 2, "tokens_per_second": 50.5})
    assert own == ClientLimits(2, 0.2, 1, 50.5, 51)  # a rate given alone: one second's bucket of its own
    assert own.kinds() == ("in_progress", "rate", "tokens")
    assert server.given({"calls_per_second": 0}).kinds() == ()  # 0: none of that kind for this client
    assert server.given({"calls_per_second": 5, "burst": 20}).burst == 20


def retrying(address: str, codes: list[str], backoff: str) -> grpc.Channel:
    """A channel whose calls to AttnServe are tried again on ``codes``, after ``backoff`` unless the
    server says how long to wait (grpc-retry-pushback-ms), as a gRPC client's service config sets it."""
    policy = {"maxAttempts": 2, "initialBackoff": backoff, "maxBackoff": backoff, "backoffMultiplier": 1,
              "retryableStatusCodes": codes}  # fmt: skip
    config = {"methodConfig": [{"name": [{"service": "attnserve.v1.AttnServe"}], "retryPolicy": policy}]}
    return grpc.insecure_channel(address, options=[("grpc.service_config", json.dumps(config))])


def pushed_back(stub: pb_grpc.AttnServeStub, metadata: list[tuple[str, str]], says: str, why: str) -> int:
    """An Encode with ``metadata``'s key, refused RESOURCE_EXHAUSTED for a rate of its client's whose
    message starts ``says`` (and whose reason is ``why``): the milliseconds it was told to wait, in the
    message and as grpc-retry-pushback-ms alike."""
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=metadata, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = e.value.details() or ""
    pushback = int(dict(e.value.trailing_metadata() or ())["grpc-retry-pushback-ms"])
    assert details.startswith(f"{says}; retry in ") and details.endswith(f"retry in {pushback} ms"), details
    # the same as a google.rpc.RetryInfo, for clients that read the status' details
    retry = detail(rich(e.value), error_details_pb2.RetryInfo)
    assert retry is not None and retry.retry_delay.ToMilliseconds() == pushback
    assert reason(e.value) == why
    return pushback


def test_a_client_over_its_rate_is_refused_and_told_when_to_come_back(model_dir: Path, tmp_path: Path) -> None:
    """client_calls_per_second: each client's calls are taken from a bucket of client_burst, filled at
    that rate; past it, its calls are refused RESOURCE_EXHAUSTED with grpc-retry-pushback-ms, which a
    gRPC client with a retry policy waits for in place of its own backoff, and others are served."""
    path = tmp_path / "keys"
    path.write_text("alice key-a\nbob key-b\n")
    st = ServerThread(config(model_dir, api_keys_file=path, client_calls_per_second=0.5, client_burst=2)).start()
    try:
        alice = [("authorization", "Bearer key-a")]
        stub = st.stub()
        for _ in range(2):  # the burst, at once
            stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=alice, timeout=30)
        says = "client alice is over its rate of 0.5 calls a second (a burst of 2)"
        pushback = pushed_back(stub, alice, says, "CLIENT_CALL_RATE")
        assert 0 < pushback <= 2000
        assert works(st.address, "key-b")  # a bucket of its own
        assert st.server.guard.in_flight == 0  # refused before it took a place
        # refused again at once, then tried again as the server said, not after the policy's 60 s
        start = time.monotonic()
        answer = pb_grpc.AttnServeStub(retrying(st.address, ["RESOURCE_EXHAUSTED"], "60s")).Encode(
            pb.EncodeRequest(texts=["hi"]), metadata=alice, timeout=30
        )
        assert len(answer.embeddings) == 1 and time.monotonic() - start < 10
        m = metrics(st)

        def limited(client: str) -> float:
            return m[("attnserve_client_calls_limited_total", (("client", client), ("limit", "rate")))]

        assert (limited("alice"), limited("bob")) == (2, 0)
        assert ("attnserve_client_calls_limited_total", (("client", "alice"), ("limit", "in_progress"))) not in m
        refused = ("attnserve_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("rpc", "Encode")))
        assert m[refused] == 2
    finally:
        st.stop()


def test_a_client_over_its_token_rate_is_refused_until_its_bucket_fills_again(model_dir: Path, tmp_path: Path) -> None:
    """client_tokens_per_second: the tokens the model reads and generates for a client (those
    attnserve_client_tokens_total counts) are taken from a bucket of client_token_burst, filled at
    that rate. A call is taken while the bucket holds any; what it uses is taken as it is counted,
    so the bucket may go below empty, and the client's calls are then refused RESOURCE_EXHAUSTED
    with grpc-retry-pushback-ms until it has filled back above it. Others are served meanwhile."""
    path = tmp_path / "keys"
    path.write_text("alice key-a\nbob key-b\ncarol key-c\n")
    limits = {"client_tokens_per_second": 40.0, "client_token_burst": 60}
    st = ServerThread(config(model_dir, api_keys_file=path, **limits)).start()
    try:
        alice, carol = [("authorization", "Bearer key-a")], [("authorization", "Bearer key-c")]
        stub = st.stub()
        read = stub.Encode(pb.EncodeRequest(texts=["the king speaks to the crown"] * 8), metadata=alice, timeout=30)
        used = sum(e.token_count for e in read.embeddings)
        assert used > 60  # taken with a full bucket, and more than it held
        says = "client alice is over its rate of 40 tokens a second (a burst of 60)"
        pushback = pushed_back(stub, alice, says, "CLIENT_TOKEN_RATE")
        refused = time.monotonic()
        assert 0 < pushback <= (used - 60) / 40 * 1000 + 1  # the debt, at 40 a second (less what filled since)
        assert works(st.address, "key-b")  # a bucket of its own
        # tried again as the server said (not after the policy's 60 s), and not taken before the debt is paid
        answer = pb_grpc.AttnServeStub(retrying(st.address, ["RESOURCE_EXHAUSTED"], "60s")).Encode(
            pb.EncodeRequest(texts=["hi"]), metadata=alice, timeout=30
        )
        assert len(answer.embeddings) == 1 and pushback / 1000 - 0.05 <= time.monotonic() - refused < 10
        # generation: its prompt and what it generated, taken as the stream ends
        request = pb.GenerateRequest(prompt="The king", max_new_tokens=80, temperature=0.0)
        done = list(stub.GenerateStream(request, metadata=carol, timeout=30))[-1]
        assert done.usage.prompt_tokens + done.usage.generated_tokens > 60
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request, metadata=carol, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client carol is over its rate of 40 tokens" in (e.value.details() or "")
        m = metrics(st)

        def limited(client: str) -> float:
            return m[("attnserve_client_calls_limited_total", (("client", client), ("limit", "tokens")))]

        assert (limited("alice"), limited("bob"), limited("carol")) == (2, 0, 1)
        assert ("attnserve_client_calls_limited_total", (("client", "alice"), ("limit", "rate"))) not in m
    finally:
        st.stop()


@pytest.mark.parametrize(
    ("rate", "burst"), [("client_calls_per_second", "client_burst"), ("client_tokens_per_second", "client_token_burst")]
)
def test_a_client_rate_is_checked_at_start(tmp_path: Path, rate: str, burst: str) -> None:
    path = tmp_path / "keys"
    path.write_text("alice key-a\n")
    with pytest.raises(ValueError, match=f"{rate} needs api_keys_file"):
        ServerConfig(**{rate: 10})
    with pytest.raises(ValueError, match=f"{rate} must be >= 0"):
        ServerConfig(api_keys_file=path, **{rate: -1})
    with pytest.raises(ValueError, match=f"{burst} needs {rate}"):
        ServerConfig(api_keys_file=path, **{burst: 5})
    with pytest.raises(ValueError, match=f"{burst} must be >= 0"):
        ServerConfig(api_keys_file=path, **{rate: 1, burst: -1})
    argv = ["serve", f"--{rate.replace('_', '-')}", "2.5", f"--{burst.replace('_', '-')}", "10"]
    cfg = ServerConfig.from_sources(build_parser().parse_args(argv), {"ATTNSERVE_API_KEYS_FILE": str(path)})
    assert (getattr(cfg, rate), getattr(cfg, burst)) == (2.5, 10)


def test_the_command_line_client_comes_back_when_the_server_says(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``attnserve client`` tries a refused call again (--retries) after grpc-retry-pushback-ms."""
    path = tmp_path / "keys"
    path.write_text("alice key-a\n")
    st = ServerThread(config(model_dir, api_keys_file=path, client_calls_per_second=0.5, client_burst=1)).start()

    def run(*argv: str) -> tuple[int, str]:
        args = ["client", "--address", st.address, "--api-key", "key-a", *argv, "encode", "hi"]
        code = client.main(build_parser().parse_args(args))
        return code, capsys.readouterr().err

    try:
        assert run() == (0, "")  # the bucket's one call
        code, err = run("--retries", "0")
        assert code == 1 and err.startswith("RESOURCE_EXHAUSTED (CLIENT_CALL_RATE): client alice is over its rate")
        start = time.monotonic()
        assert run() == (0, "")  # refused, then served after the pushback (up to 2 s)
        assert time.monotonic() - start < 10
        limited = ("attnserve_client_calls_limited_total", (("client", "alice"), ("limit", "rate")))
        assert metrics(st)[limited] == 2
        says = "attnserve client: --retries must be 0 to 4 (gRPC tries a call at most 5 times), got 5\n"
        assert run("--retries", "5") == (2, says)
    finally:
        st.stop()


def test_each_clients_tokens_are_counted_by_kind(model_dir: Path, tmp_path: Path) -> None:
    """attnserve_client_tokens_total: what each client had the model read (input: Encode's and
    AttentionMap's texts; prompt: generation's prompts) and generate, as the usage it was told says,
    over both APIs; a stream its client leaves is counted for what was generated before it left."""
    path = tmp_path / "keys"
    path.write_text("alice key-a\nbob key-b\ncarol key-c\ndave key-d\n")
    st = ServerThread(config(model_dir, api_keys_file=path)).start()
    alice, bob = [("authorization", "Bearer key-a")], [("authorization", "Bearer key-b")]
    carol = [("authorization", "Bearer key-c")]
    try:
        stub = st.stub()

        # (tokenizing runs no model: carol's calls count no tokens)
        said = stub.Tokenize(pb.TokenizeRequest(texts=["the queen", "Good sir"]), metadata=carol, timeout=30)
        queen, sir = (len(t.ids) for t in said.tokenizations)

        encoded = stub.Encode(pb.EncodeRequest(texts=["the king speaks", "my lord"]), metadata=alice, timeout=30)
        attended = stub.AttentionMap(pb.AttentionMapRequest(text="the crown"), metadata=alice, timeout=30)
        text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
        text.contents.bytes_contents.append(b"the queen")
        v2_stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address))
        infer = v2.ModelInferRequest(model_name="attnserve-encode", inputs=[text])
        v2_stub.ModelInfer(infer, metadata=alice, timeout=30)
        prompt = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
        prompt.contents.bytes_contents.append(b"My lord")
        generate = v2.ModelInferRequest(model_name="attnserve-generate", inputs=[prompt])
        generate.parameters["max_new_tokens"].int64_param = 3
        *_, last = v2_stub.ModelStreamInfer(iter([generate]), metadata=alice, timeout=30)  # streamed, on the v2 API
        usage = last.infer_response.parameters
        made = stub.Generate(pb.GenerateRequest(prompt="The king", max_new_tokens=5), metadata=bob, timeout=30)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="Good sir", max_new_tokens=200), metadata=bob)
        received = [next(stream)]
        stream.cancel()  # left after its first message (unless the model ended it first)
        with contextlib.suppress(grpc.RpcError):
            received.extend(stream)
        assert wait_for(lambda: st.server.scheduler is not None and not st.server.scheduler.running)
        m = metrics(st)

        def tokens(client: str, kind: str) -> float:
            return m[("attnserve_client_tokens_total", (("client", client), ("kind", kind)))]

        inputs = sum(e.token_count for e in encoded.embeddings) + len(attended.token_ids) + queen
        v2_usage = usage["prompt_tokens"].int64_param, usage["generated_tokens"].int64_param
        alices = tokens("alice", "input"), tokens("alice", "prompt"), tokens("alice", "generated")
        assert alices == (inputs, *v2_usage)
        assert (tokens("bob", "input"), tokens("bob", "prompt")) == (0, made.usage.prompt_tokens + sir)
        generated = tokens("bob", "generated") - made.usage.generated_tokens
        assert sum(len(m.tokens) for m in received) <= generated < 200
        assert (tokens("carol", "input"), tokens("carol", "prompt"), tokens("carol", "generated")) == (0, 0, 0)
        assert ("attnserve_client_tokens_total", (("client", "dave"), ("kind", "input"))) not in m  # no call yet
    finally:
        st.stop()


def test_the_clients_retries_stop_while_most_of_its_calls_are_refused(model_dir: Path) -> None:
    """service_config's retries come with gRPC's retry throttling: a channel whose calls keep being
    refused stops trying them again (each refusal takes a token of 10, each call served gives back a
    tenth, and retries stop at half), so that behind a server at its bound its clients do not send
    three calls for each one (a lone refusal among calls served is still tried again, above)."""
    st = ServerThread(config(model_dir, max_concurrent_calls=1)).start()
    st.server.guard.stalled_seconds = 60.0  # the held call is not to make room here
    peer = Peer(st.address)
    try:
        held = peer.open("/attnserve.v1.AttnServe/Encode")  # the one place, held with nothing sent
        assert wait_for(lambda: st.server.guard.in_flight == 1)
        stub = pb_grpc.AttnServeStub(client.channel(st.address, retries=2))
        refused = ("attnserve_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("rpc", "Encode")))
        before = metrics(st).get(refused, 0)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as e:
                stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        attempts = metrics(st)[refused] - before
        # 5 refusals take the channel to half its tokens: 3 + 2 tries, then one a call (not 60)
        assert attempts == 5 + 18, attempts
        assert not peer.answered({held}, timeout=0.1)  # held all along
    finally:
        peer.close()
        st.stop()
