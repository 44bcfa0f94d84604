"""Connections that go wrong below gRPC: a client that vanishes without closing its connection, a peer
that opens connections and sends nothing on them, connections recycled by age so that clients
spread over replicas, and a client that reads none of its answers.

Between the client and the server runs a TCP relay that forwards bytes both ways until it is frozen;
frozen, it keeps both connections open and forwards nothing, as a client host that lost power or a
network cut looks from the server.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.connection
import pytest
from grpc_health.v1 import health_pb2

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.config import ServerConfig
from service.server import CLIENT_PING_SECONDS, NEVER_MS, connection_options
from tests.reliability.conftest import SERVING, health
from tests.reliability.test_http2 import Peer, framed
from tests.service.conftest import ServerThread, config, wait_for
from tests.service.test_kserve import infer
from tests.service.test_server import metrics, reason


class Relay:
    """Forwards every connection made to ``port`` to ``target`` until ``freeze()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self.frozen.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.05)
                if self.frozen.is_set():
                    return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):  # (ValueError: a socket close() shut while it was selected on)
            return

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def pinged(model_dir: Path) -> Iterator[ServerThread]:
    st = ServerThread(config(model_dir, keepalive_seconds=0.5, keepalive_timeout_seconds=0.5)).start()
    yield st
    st.stop()


def test_a_client_that_vanishes_mid_call_gives_its_place_back(pinged: ServerThread) -> None:
    """A v2 stream holds one of the server's places from the moment it opens. Its client goes quiet
    without closing the connection: the keepalive ping finds it out and the call is cancelled (with
    gRPC's own settings it would hold the place for as long as TCP took to notice, hours)."""
    relay = Relay(("127.0.0.1", pinged.server.port))
    requests: queue.SimpleQueue[v2.ModelInferRequest | None] = queue.SimpleQueue()
    channel = grpc.insecure_channel(f"127.0.0.1:{relay.port}")
    try:
        call = v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None))
        guard = pinged.server.guard
        assert wait_for(lambda: guard.in_flight == 1, 10)
        relay.freeze()
        time.sleep(0.2)
        assert guard.in_flight == 1  # not at once: only once a ping goes unanswered
        assert wait_for(lambda: guard.in_flight == 0, 10), "the vanished client's call still holds its place"
        assert health(pinged.address) == SERVING
        served = pb_grpc.AttnServeStub(grpc.insecure_channel(pinged.address)).Encode(pb.EncodeRequest(texts=["hi"]))
        assert len(served.embeddings) == 1
    finally:
        requests.put(None)
        call.cancel()
        channel.close()
        relay.close()


def test_connections_that_send_no_handshake_are_closed_after_the_handshake_timeout(model_dir: Path) -> None:
    """Clients send HTTP/2's preface and settings at once; gRPC's own wait for them is two minutes,
    for which a peer that opened connections and sent nothing held a descriptor each."""
    st = ServerThread(config(model_dir, handshake_timeout_seconds=0.5)).start()
    try:
        for sent in (b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):  # nothing; the preface without settings
            with socket.create_connection(("127.0.0.1", st.server.port), timeout=10) as sock:
                sock.sendall(sent)
                start = time.monotonic()
                while sock.recv(4096):  # the server's own settings, then the end of the connection
                    pass
                assert time.monotonic() - start < 5
        assert health(st.address) == SERVING  # a client that sends its handshake is served as ever
    finally:
        st.stop()


def test_connections_are_closed_after_their_age_and_clients_reconnect(model_dir: Path) -> None:
    st = ServerThread(config(model_dir, max_connection_age_seconds=0.5, grace_seconds=1.0)).start()
    relay = Relay(("127.0.0.1", st.server.port))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            stub = pb_grpc.AttnServeStub(channel)
            for _ in range(3):
                assert len(stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1
                time.sleep(1.0)
        assert relay.accepted >= 2  # the server closed the first connection; the channel made another
    finally:
        relay.close()
        st.stop()


def test_idle_connections_are_closed_and_busy_ones_are_not(model_dir: Path) -> None:
    """A connection with no call in progress for max_connection_idle_seconds is closed (GOAWAY), and its
    client reconnects when it next calls; one with a call in progress stays open however long it runs."""
    st = ServerThread(config(model_dir, max_connection_idle_seconds=0.5)).start()
    relay = Relay(("127.0.0.1", st.server.port))
    idle, busy = Peer(st.address), Peer(st.address)
    try:
        watch = busy.open("/grpc.health.v1.Health/Watch", framed(health_pb2.HealthCheckRequest().SerializeToString()))

        def closed(peer: Peer) -> bool:
            return bool(peer.h2.state_machine.state == h2.connection.ConnectionState.CLOSED)

        start = time.monotonic()
        assert idle.idle(lambda: closed(idle), 10), "the idle connection was not closed"
        assert 0.4 < time.monotonic() - start < 5
        assert not busy.idle(lambda: closed(busy), 1.5), "a connection with a call in progress was closed"
        assert watch not in busy.statuses  # its watch goes on
        with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
            stub = pb_grpc.AttnServeStub(channel)
            for _ in range(2):
                assert len(stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1
                time.sleep(1.0)
            assert len(stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1
        assert relay.accepted >= 2  # closed while idle; the channel made another
    finally:
        idle.close()
        busy.close()
        relay.close()
        st.stop()


def test_connection_settings_as_grpc_reads_them() -> None:
    options = dict(connection_options(ServerConfig(keepalive_seconds=30, keepalive_timeout_seconds=10)))
    assert options["grpc.keepalive_time_ms"] == 30_000
    # the ping's answer is awaited as long as the keepalive's, not gRPC's minute
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 10_000
    # clients that ping as often as gRPC's clients may are not turned away
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == CLIENT_PING_SECONDS * 1000 == 10_000
    assert options["grpc.max_connection_age_ms"] == NEVER_MS  # by default connections live on
    assert options["grpc.max_connection_idle_ms"] == NEVER_MS
    assert options["grpc.server_handshake_timeout_ms"] == 10_000  # not gRPC's two minutes
    off = dict(connection_options(ServerConfig(keepalive_seconds=0, max_connection_age_seconds=300, grace_seconds=20)))
    assert off["grpc.keepalive_time_ms"] == NEVER_MS
    assert off["grpc.max_connection_age_ms"] == 300_000 and off["grpc.max_connection_age_grace_ms"] == 20_000
    for bad in (
        {"keepalive_seconds": -1},
        {"keepalive_timeout_seconds": 0},
        {"max_connection_age_seconds": -5},
        {"max_connection_idle_seconds": -1},
    ):
        with pytest.raises(ValueError, match=r"keepalive_seconds, max_connection_age_seconds and .* must be >= 0"):
            ServerConfig(**bad)  # type: ignore[arg-type]
    for port in ({"health_port": 70000}, {"health_port": -2}, {"metrics_port": -2}):
        with pytest.raises(ValueError, match=r"ports must be in 0..65535"):
            ServerConfig(**port)  # type: ignore[arg-type]
    for bad in ({"handshake_timeout_seconds": 0}, {"request_read_timeout_seconds": -1}):
        with pytest.raises(ValueError, match="handshake_timeout_seconds and request_read_timeout_seconds must be > 0"):
            ServerConfig(**bad)  # type: ignore[arg-type]


def test_a_client_that_reads_nothing_holds_its_answers_until_its_connection_ages_out(model_dir: Path) -> None:
    """A client that asks for an attention map and reads none of it (its HTTP/2 window left shut)
    holds the map's bytes in the budget, and the answer in gRPC's transport, for as long as its
    connection lives: a call cannot end while its answer waits, grpc.aio has no way to reset a stream
    from the server, and keepalive finds out only clients that stop answering pings (a live one's
    HTTP/2 stack answers them). The connection's age ends it: past max_connection_age_seconds and
    its grace the connection is closed, and what its calls held comes back."""
    st = ServerThread(config(model_dir, max_attention_bytes=1, max_connection_age_seconds=1.0, grace_seconds=1.0))
    st.start()
    budget = st.server.servicer.attention_budget
    # cut to the tiny model's context, 64 tokens: a map of 128 KiB, past the 64 KiB a shut window lets out
    text = "the king speaks to the court " * 30
    stub = st.stub()
    peer = Peer(st.address)
    try:
        peer.open(
            "/attnserve.v1.AttnServe/AttentionMap",
            framed(pb.AttentionMapRequest(text=text, truncation=pb.TRUNCATION_END).SerializeToString()),
            end=True,
        )
        assert peer.idle(lambda: budget.held > 0)
        peer.idle(lambda: False, 0.5)
        assert budget.held > 0  # computed, and waiting for a window that does not open
        with pytest.raises(grpc.RpcError) as e:
            stub.AttentionMap(pb.AttentionMapRequest(text="the crown"), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert peer.idle(lambda: budget.held == 0, 15)  # an age of 1 s (gRPC adds up to 10%) and 1 s of grace
        assert len(stub.AttentionMap(pb.AttentionMapRequest(text="the crown"), timeout=10).probabilities) > 0
    finally:
        peer.close()
        st.stop()


def test_with_api_keys_a_client_that_reads_nothing_holds_at_most_half_of_the_attention_budget(
    model_dir: Path, tmp_path: Path
) -> None:
    """Its maps wait in gRPC's transport as above, but past half of max_attention_bytes its next call
    is refused for it alone (CLIENT_ATTENTION_BYTES), and the other clients' maps are still served."""
    keys = tmp_path / "keys"
    keys.write_text("reads-nothing key-a\nreads-all key-b\n")
    map_bytes = 2 * 2 * 64 * 64 * 4  # the tiny model's 2 layers, 2 heads, 64 tokens: 64 KiB
    st = ServerThread(config(model_dir, api_keys_file=keys, max_attention_bytes=int(2.5 * map_bytes))).start()
    budget = st.server.servicer.attention_budget
    text = "the king speaks to the court " * 30  # cut to the context: a full map, past a shut window
    request = pb.AttentionMapRequest(text=text, truncation=pb.TRUNCATION_END)
    peer = Peer(st.address)
    try:
        peer.open(
            "/attnserve.v1.AttnServe/AttentionMap",
            framed(request.SerializeToString()),
            end=True,
            metadata=(("authorization", "Bearer key-a"),),
        )
        assert peer.idle(lambda: budget.held == map_bytes)
        stub = st.stub()
        with pytest.raises(grpc.RpcError) as e:  # its own second map: past its half
            stub.AttentionMap(request, timeout=10, metadata=[("authorization", "Bearer key-a")])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e.value) == "CLIENT_ATTENTION_BYTES"
        assert "this client holds 0.1 MiB" in e.value.details()
        for _ in range(3):  # another client's, one after another: within the budget beside the held one
            answer = stub.AttentionMap(request, timeout=10, metadata=[("authorization", "Bearer key-b")])
            assert len(answer.probabilities) == map_bytes
        assert wait_for(lambda: budget.held == map_bytes)  # (each answer's bytes given back as its call ends)
        assert budget.by_client == {"reads-nothing": map_bytes}
    finally:
        peer.close()
        st.stop()
    assert budget.held == 0 and budget.by_client == {}


def test_a_client_that_reads_none_of_its_streams_holds_their_places_and_no_one_waits_on_it(
    model_dir: Path,
) -> None:
    """Streams whose client reads none of their messages: once its window is full their messages wait
    in gRPC's transport and each stream keeps its place in max_concurrent_calls until its connection
    goes or stream_write_timeout_seconds (30) pass (below), but their sequences are generated and
    retired as any others, so the generation loop waits on no client and everyone else's calls are
    served meanwhile."""
    st = ServerThread(config(model_dir)).start()
    guard, scheduler = st.server.guard, st.server.scheduler
    # each token with its 20 likeliest alternatives and where it attended: ~1 KB a message, so eight
    # streams pass the 64 KiB window a client that reads nothing leaves shut
    heavy = pb.GenerateRequest(
        prompt="the king", max_new_tokens=48, temperature=1.0, seed=7, logprobs=True, top_logprobs=20,
        return_attention=True,
    )  # fmt: skip
    stub = st.stub()
    peer = Peer(st.address)
    try:
        for _ in range(8):
            peer.open("/attnserve.v1.AttnServe/GenerateStream", framed(heavy.SerializeToString()), end=True)
        assert peer.idle(lambda: guard.in_flight == 8 and not scheduler.running and not scheduler.waiting)
        peer.idle(lambda: False, 1.0)
        assert guard.in_flight == 8  # their messages still wait for the window
        light = pb.GenerateRequest(prompt="the crown", max_new_tokens=16)
        assert stub.Generate(light, timeout=10).usage.generated_tokens > 0
        assert list(stub.GenerateStream(light, timeout=10))[-1].finish_reason
        assert len(stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1
        peer.close()
        assert wait_for(lambda: guard.in_flight == 0)  # the connection gone, the places are back
    finally:
        peer.close()
        st.stop()


def test_streams_whose_client_reads_nothing_are_ended_and_say_why_once_it_reads(model_dir: Path) -> None:
    """With stream_write_timeout_seconds, a stream whose messages gRPC has waited that long to send is
    ended: its places are given back while the connection stays, and the client, once it reads,
    gets what was sent and then DEADLINE_EXCEEDED saying why."""
    st = ServerThread(config(model_dir, stream_write_timeout_seconds=0.5)).start()
    guard = st.server.guard
    heavy = pb.GenerateRequest(
        prompt="the king", max_new_tokens=48, temperature=1.0, seed=7, logprobs=True, top_logprobs=20,
        return_attention=True,
    )  # fmt: skip
    peer = Peer(st.address)
    try:
        streams = {
            peer.open("/attnserve.v1.AttnServe/GenerateStream", framed(heavy.SerializeToString()), end=True)
            for _ in range(8)
        }
        assert peer.idle(lambda: guard.in_flight == 8)
        assert peer.idle(lambda: guard.in_flight == 0, 10)  # ended, the connection open and nothing read
        m = metrics(st)
        ended = m[("attnserve_errors_total", (("reason", "STREAM_NOT_READ"), ("rpc", "GenerateStream")))]
        assert ended >= 1 and st.server.servicer.loaded.users == 0  # type: ignore[union-attr]
        # the client reads at last: what it took meanwhile (unacknowledged) and the rest
        peer.h2.increment_flow_control_window(2**24)
        for sid in streams:
            peer.h2.increment_flow_control_window(2**24, sid)
        peer._flush()
        answered = peer.answered(streams)
        assert len(answered) == 8
        cut = {sid for sid, (code, _) in answered.items() if code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}
        assert len(cut) == ended and all(answered[sid][0] == 0 for sid in streams - cut)  # the rest were sent whole
        for sid in cut:
            assert "read nothing of this stream for 0.5s" in answered[sid][1] and peer.reasons[sid] == "STREAM_NOT_READ"
    finally:
        peer.close()
        st.stop()


def test_a_stream_longer_than_the_bound_read_as_it_comes_is_not_ended(model_dir: Path) -> None:
    """What counts is how long one message waits to be sent, not how long the stream lasts: a
    generation slower than the bound, read by a client that takes each message a while after it came."""
    st = ServerThread(config(model_dir, stream_write_timeout_seconds=0.5)).start()
    runtime = st.server.scheduler.runtime  # type: ignore[union-attr]
    step = runtime.decode_step

    def slow(*args: object) -> object:
        time.sleep(0.1)
        return step(*args)

    runtime.decode_step = slow  # type: ignore[method-assign]
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    request = pb.GenerateRequest(prompt="the king", max_new_tokens=16, logprobs=True, top_logprobs=20)
    try:
        with grpc.insecure_channel(st.address, options=small_window) as channel:
            tokens, start = 0, time.monotonic()
            for message in pb_grpc.AttnServeStub(channel).GenerateStream(request, timeout=30):
                tokens += len(message.tokens)
                time.sleep(0.15)
            assert tokens == 16 and time.monotonic() - start > 1.0
    finally:
        st.stop()


def test_a_v2_stream_whose_client_reads_nothing_is_ended_and_says_why_once_it_reads(model_dir: Path) -> None:
    """The same for ModelStreamInfer, which a client may keep open for good: its requests in
    progress are ended with it, and nothing of it is held once it has ended."""
    st = ServerThread(config(model_dir, stream_write_timeout_seconds=0.5)).start()
    guard = st.server.guard
    request = infer("attnserve-encode", [f"the king speaks of {i}" for i in range(8)])  # ~1.3 KB an answer
    peer = Peer(st.address)
    try:
        sid = peer.open("/inference.GRPCInferenceService/ModelStreamInfer")
        for _ in range(4):  # 200 requests, in frames within HTTP/2's 16 KiB
            peer.h2.send_data(sid, framed(request.SerializeToString()) * 50)
        peer._flush()
        assert peer.idle(lambda: guard.in_flight == 1)
        assert peer.idle(lambda: guard.in_flight == 0, 10)  # ended, the stream still open on the client's side
        m = metrics(st)
        assert m[("attnserve_errors_total", (("reason", "STREAM_NOT_READ"), ("rpc", "ModelStreamInfer")))] == 1
        assert st.server.servicer.loaded.users == 0  # type: ignore[union-attr]
        assert st.server.servicer.write_watch.streams == set()  # type: ignore[union-attr]
        peer.h2.increment_flow_control_window(2**24)
        peer.h2.increment_flow_control_window(2**24, sid)
        peer._flush()
        (code, message) = peer.answered({sid})[sid]
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "read nothing of this stream" in message
        assert peer.reasons[sid] == "STREAM_NOT_READ"
    finally:
        peer.close()
        st.stop()
