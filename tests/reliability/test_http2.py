"""Calls made frame by frame, as no gRPC client makes them but any peer can: a call that ends before
its request arrived, one cut mid-message, calls opened and left with nothing sent (at a full bound,
past the time a request has to come, and while the server drains).

Each is answered, with a client error, and none is held outside the server's bounds.
"""

from __future__ import annotations

import base64
import contextlib
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.reliability.conftest import SERVING, health
from tests.service.conftest import ServerThread, config, wait_for
from tests.service.test_server import metrics, reason, reason_of


class Peer:
    """One HTTP/2 connection to the server, spoken with h2: streams opened and data sent as told."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.statuses: dict[int, tuple[int, str]] = {}  # stream: grpc-status, grpc-message
        self.reasons: dict[int, str] = {}  # stream: the reason of the ErrorInfo in grpc-status-details-bin
        self._flush()

    def open(
        self, path: str, data: bytes | None = None, end: bool = False, metadata: tuple[tuple[str, str], ...] = ()
    ) -> int:
        """A call's headers (and ``metadata``), then ``data`` if given; ``end`` half-closes it. The stream's id."""
        sid = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "attnserve"),
                   ("content-type", "application/grpc"), ("te", "trailers"), *metadata]  # fmt: skip
        self.h2.send_headers(sid, headers, end_stream=end and data is None)
        if data is not None:
            self.h2.send_data(sid, data, end_stream=end)
        self._flush()
        return sid

    def answered(self, streams: set[int], timeout: float = 10) -> dict[int, tuple[int, str]]:
        """Read until every stream in ``streams`` has its status, or ``timeout`` passes."""
        end = time.monotonic() + timeout
        while not streams <= self.statuses.keys() and time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers = dict(event.headers)
                    if "grpc-status" in headers:
                        self.statuses[event.stream_id] = (int(headers["grpc-status"]), headers.get("grpc-message", ""))
                    if said := headers.get("grpc-status-details-bin"):  # base64, its padding left off
                        status = status_pb2.Status.FromString(base64.b64decode(said + "=" * (-len(said) % 4)))
                        self.reasons[event.stream_id] = reason_of(status)
                elif isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self._flush()
        return {s: self.statuses[s] for s in streams if s in self.statuses}

    def idle(self, condition: Callable[[], bool], seconds: float = 10) -> bool:
        """Read until ``condition`` holds or ``seconds`` pass, answering the server's settings and pings
        as any HTTP/2 peer does but taking none of its data: its windows stay shut, as a client that
        reads nothing leaves them. Whether ``condition`` came to hold."""
        end = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > end:
                return False
            self.sock.settimeout(0.02)
            # (h2 takes no frame after the server's GOAWAY: what comes after it is read and dropped)
            with contextlib.suppress(TimeoutError, OSError, h2.exceptions.ProtocolError):
                if data := self.sock.recv(65536):
                    self.h2.receive_data(data)
                    self._flush()
                else:
                    time.sleep(0.02)  # closed by the server
        return True

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())


def framed(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4, "big") + message


INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
ENCODE = "/attnserve.v1.AttnServe/Encode"
CHECK = "/grpc.health.v1.Health/Check"
LIVE = "/inference.GRPCInferenceService/ServerLive"


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[ServerThread]:
    st = ServerThread(config(model_dir, max_concurrent_calls=4, max_probe_streams=3)).start()
    yield st
    st.stop()


@pytest.mark.parametrize(
    "path",
    [
        ENCODE,
        "/attnserve.v1.AttnServe/GenerateStream",  # one request, a stream of answers
        "/inference.GRPCInferenceService/ModelInfer",
        CHECK,
        "/grpc.health.v1.Health/Watch",
    ],
)
@pytest.mark.parametrize(
    "body",
    [None, b"", b"\0\0\0", framed(pb.EncodeRequest(texts=["hello"]).SerializeToString())[:-3]],
    ids=["no data", "empty data", "a cut prefix", "a cut message"],
)
def test_a_call_that_ends_before_its_request_came_is_answered(
    served: ServerThread, path: str, body: bytes | None
) -> None:
    """grpc.aio reads the request of such methods itself and, finding none, returns without a
    status: the call was never answered, and held its memory until the connection closed."""
    peer = Peer(served.address)
    try:
        sid = peer.open(path, body, end=True)
        code, message = peer.answered({sid})[sid]
        assert code == INVALID_ARGUMENT and message.startswith("no request message")
        assert peer.reasons[sid] == "NO_REQUEST"
    finally:
        peer.close()
    assert wait_for(lambda: served.server.guard.in_flight == 0)  # its place given back as the call ends
    assert health(served.address) == SERVING


def test_calls_opened_with_nothing_sent_hold_their_places_and_give_them_back(served: ServerThread) -> None:
    """A call waiting for its request counts against max_concurrent_calls (4 here) like any other,
    so calls a client opens and sends nothing on cannot pile up outside it."""
    guard = served.server.guard
    peer = Peer(served.address)
    try:
        held = [peer.open(ENCODE) for _ in range(4)]
        assert wait_for(lambda: guard.in_flight == 4)
        over = {peer.open(ENCODE), peer.open(ENCODE)}
        answers = peer.answered(over)
        assert {code for code, _ in answers.values()} == {RESOURCE_EXHAUSTED}, answers
        assert {peer.reasons[s] for s in over} == {"CALLS_AT_LIMIT"}
        with pytest.raises(grpc.RpcError) as e:
            served.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e.value) == "CALLS_AT_LIMIT"
        assert health(served.address) == SERVING
        assert not peer.answered(set(held), timeout=0.2)  # still waiting: nothing was sent on them
    finally:
        peer.close()
    assert wait_for(lambda: guard.in_flight == 0)  # the connection closed: every place is back
    assert len(served.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1


def test_health_checks_whose_requests_never_come_are_bounded_and_a_sent_check_is_answered(
    served: ServerThread,
) -> None:
    """Checks (and the v2 service's liveness, readiness and metadata calls) are answered as soon as
    their requests are read, so only those whose requests never come add up: past max_probe_streams
    (3 here) the one waiting longest is refused, never the one that opens, and a Check sent whole is
    answered whatever waits."""
    guard = served.server.guard
    refused = ("attnserve_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("rpc", "ServerLive")))
    before = metrics(served).get(refused, 0)
    peer = Peer(served.address)
    try:
        # the v2 service's liveness calls count with health's Checks
        opened = [peer.open(LIVE), peer.open(LIVE)]
        assert wait_for(lambda: guard.probes_waiting == 2)  # these two first
        opened += [peer.open(CHECK) for _ in range(3)]
        answers = peer.answered(set(opened[:2]))
        assert [answers[s][0] for s in opened[:2]] == [RESOURCE_EXHAUSTED] * 2
        assert "waited longest" in answers[opened[0]][1]
        assert peer.reasons[opened[0]] == peer.reasons[opened[1]] == "REQUEST_NOT_SENT"
        assert metrics(served).get(refused, 0) == before + 2  # counted under the method refused
        assert not peer.answered(set(opened[2:]), timeout=0.2)
        assert guard.probes_waiting == 3
        assert health(served.address) == SERVING  # a Check sent whole, on a connection of its own
        whole = peer.open(CHECK, framed(b""), end=True)  # and on the same connection as those waiting
        assert peer.answered({whole})[whole][0] == 0
    finally:
        peer.close()
    assert wait_for(lambda: not guard.probes_waiting)


DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
WATCH = "/grpc.health.v1.Health/Watch"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"  # a stream of requests, as reflection's
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture(scope="module")
def impatient(model_dir: Path) -> Iterator[ServerThread]:
    """A server that waits half a second for a call's request, with four places for calls and four for streams."""
    st = ServerThread(
        config(model_dir, max_concurrent_calls=4, max_probe_streams=4, request_read_timeout_seconds=0.5)
    ).start()
    yield st
    st.stop()


@pytest.mark.parametrize("path", [ENCODE, "/attnserve.v1.AttnServe/GenerateStream", CHECK, LIVE, WATCH, REFLECTION])
@pytest.mark.parametrize("body", [None, framed(pb.EncodeRequest(texts=["hello"]).SerializeToString())[:-3]],
                         ids=["nothing sent", "a cut message"])  # fmt: skip
def test_a_call_whose_request_does_not_come_in_time_is_answered_and_gives_back_its_place(
    impatient: ServerThread, path: str, body: bytes | None
) -> None:
    """A call left open with its request unsent (or half sent) held its place until the client
    closed its connection: a client that stalls, or a proxy that drops the body, kept it forever."""
    guard = impatient.server.guard
    rpc = path.rsplit("/", 1)[1]
    timed_out = ("attnserve_requests_total", (("code", "DEADLINE_EXCEEDED"), ("rpc", rpc)))
    no_request = ("attnserve_calls_without_request_total", (("reason", "read_timeout"),))
    before, before_apart = metrics(impatient).get(timed_out, 0), metrics(impatient)[no_request]
    peer = Peer(impatient.address)
    try:
        sid = peer.open(path, body)
        code, message = peer.answered({sid}, timeout=10)[sid]
        assert code == DEADLINE_EXCEEDED and "no whole request within 0.5 s" in message, message
        assert peer.reasons[sid] == "REQUEST_READ_TIMEOUT"
        assert wait_for(lambda: guard.in_flight == 0 and guard.streams_open == 0 and not guard.probes_waiting)
        # counted apart too, so that the error ratio's alert leaves it out: the client sent nothing
        assert metrics(impatient).get(timed_out, 0) == before + 1
        assert metrics(impatient)[no_request] == before_apart + 1
    finally:
        peer.close()
    assert health(impatient.address) == SERVING


@pytest.mark.parametrize("path", [ENCODE, WATCH, STREAM_INFER, REFLECTION])
def test_at_the_bound_a_call_stalled_for_its_request_gives_its_place_to_one_that_comes(
    impatient: ServerThread, path: str
) -> None:
    """Four calls opened with nothing sent fill their bound (max_concurrent_calls for the model's
    calls, the v2 stream's among them; max_probe_streams for health's Watch and reflection's stream;
    4 here). A call that comes while they wait is refused only while they are fresh; once one has
    waited a second (``stalled_seconds``) for its request, the one waiting longest is refused
    instead, so a client that opens calls and sends nothing cannot keep out those that send theirs."""
    guard = impatient.server.guard
    admitted = path in (ENCODE, STREAM_INFER)
    held_now = (lambda: guard.in_flight) if admitted else (lambda: guard.streams_open)
    channel = grpc.insecure_channel(impatient.address)
    stub, watcher = pb_grpc.AttnServeStub(channel), health_pb2_grpc.HealthStub(channel)

    def newcomer() -> None:
        if admitted:
            assert len(stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=10).embeddings) == 1
        else:
            watch = watcher.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == SERVING
            watch.cancel()

    assert health(impatient.address, channel=channel) == SERVING  # connected before the clock starts
    guard.read_timeout = 30.0  # the held calls are not to time out here
    peer = Peer(impatient.address)
    # a v2 stream is told idle by its handler from its opening (the next test): it gives its place as
    # an idle stream does
    why, said, told = (
        ("idle", "no request in progress for the longest", "IDLE_STREAM")
        if path == STREAM_INFER
        else ("evicted", "waited longest for its request", "REQUEST_NOT_SENT")
    )
    try:
        evicted = ("attnserve_calls_without_request_total", (("reason", why),))
        before = metrics(impatient)[evicted]
        held = [peer.open(path) for _ in range(4)]
        assert wait_for(lambda: held_now() == 4)
        with pytest.raises(grpc.RpcError) as e:  # fresh: the newcomer is refused, as at any full server
            newcomer()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(e.value) == ("CALLS_AT_LIMIT" if admitted else "STREAMS_AT_LIMIT")
        time.sleep(guard.stalled_seconds + 0.1)
        newcomer()
        answers = peer.answered(set(held), timeout=1)
        assert list(answers) == [held[0]] and answers[held[0]][0] == RESOURCE_EXHAUSTED, answers
        assert said in answers[held[0]][1] and peer.reasons[held[0]] == told
        assert wait_for(lambda: held_now() == 3)  # the three left; the newcomer has gone
        assert metrics(impatient)[evicted] == before + 1
    finally:
        peer.close()
        channel.close()
        guard.read_timeout = 0.5
    assert wait_for(lambda: held_now() == 0)


def test_at_the_bound_a_reflection_stream_idle_after_its_answers_gives_its_place(impatient: ServerThread) -> None:
    """A reflection stream is answered request by request and may be kept open with none in progress,
    holding a place of max_probe_streams (4 here) that health's Watches need. At that bound the one
    idle longest, once a second, is ended RESOURCE_EXHAUSTED to make room, as the model's idle
    streams are at theirs; one whose requests keep coming is not."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    guard = impatient.server.guard
    channel = grpc.insecure_channel(impatient.address)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
    watcher = health_pb2_grpc.HealthStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    outgoing: list[queue.Queue[reflection_pb2.ServerReflectionRequest | None]] = [queue.Queue() for _ in range(4)]
    idle = ("attnserve_calls_without_request_total", (("reason", "idle"),))
    before = metrics(impatient)[idle]
    try:
        streams = []
        for q in outgoing:  # each asks once, is answered, and stays open
            q.put(ask)
            streams.append(reflect(iter(q.get, None), timeout=30))
            assert next(streams[-1]).list_services_response.service
        assert wait_for(lambda: guard.streams_open == 4)
        with pytest.raises(grpc.RpcError) as e:  # fresh: the Watch is refused
            next(watcher.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e.value) == "STREAMS_AT_LIMIT"
        until = time.monotonic() + guard.stalled_seconds + 0.3
        while time.monotonic() < until:  # the first idles; the others keep asking
            for q, stream in zip(outgoing[1:], streams[1:], strict=True):
                q.put(ask)
                assert next(stream).list_services_response.service
            time.sleep(0.2)
        watch = watcher.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as e:
            next(streams[0])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e.value) == "IDLE_STREAM"
        assert "this stream had no request in progress for the longest" in (e.value.details() or "")
        for q, stream in zip(outgoing[1:], streams[1:], strict=True):  # the others go on
            q.put(ask)
            assert next(stream).list_services_response.service
        assert metrics(impatient)[idle] == before + 1
    finally:
        for q in outgoing:
            q.put(None)
        channel.close()
    assert wait_for(lambda: guard.streams_open == 0)


def test_a_v2_stream_may_wait_past_the_read_timeout_for_its_first_request(impatient: ServerThread) -> None:
    """tritonclient opens its stream (start_stream) before it has a request to send, and may send the
    first long after: ModelStreamInfer is not answered for a request that has not come, as a call of
    one request is. Opened with nothing sent it is an idle stream, which gives its place at a full
    bound (above) and is ended at once on shutdown (below)."""
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(impatient.address))
    outgoing: queue.Queue[v2.ModelInferRequest | None] = queue.Queue()
    stream = stub.ModelStreamInfer(iter(outgoing.get, None), timeout=30)
    try:
        assert wait_for(lambda: impatient.server.guard.in_flight == 1)
        time.sleep(impatient.server.guard.read_timeout * 3)
        text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
        text.contents.bytes_contents.append(b"the king")
        outgoing.put(v2.ModelInferRequest(model_name="attnserve-encode", inputs=[text]))
        answer = next(stream)
        assert not answer.error_message and answer.infer_response.outputs[0].name == "EMBEDDING"
    finally:
        outgoing.put(None)
    assert list(stream) == []
    assert wait_for(lambda: impatient.server.guard.in_flight == 0)


@pytest.mark.parametrize("path", [ENCODE, STREAM_INFER])
def test_on_shutdown_a_call_still_waiting_for_its_request_is_refused_not_waited_for(model_dir: Path, path: str) -> None:
    """The drain waits for the calls in progress. One opened with nothing sent held the shutdown for
    the whole grace period; it has started no work, so once the server refuses calls and it has
    waited a second (``stalled_seconds``) it is refused with UNAVAILABLE (which clients retry on
    another replica), and the drain goes on without it."""
    st = ServerThread(config(model_dir)).start()
    peer = Peer(st.address)
    try:
        sid = peer.open(path)
        assert wait_for(lambda: st.server.guard.in_flight == 1)
        start = time.monotonic()
        stopping = threading.Thread(target=st.stop, kwargs={"grace": 20})
        stopping.start()
        code, message = peer.answered({sid})[sid]
        assert code == grpc.StatusCode.UNAVAILABLE.value[0] and "shutting down" in message, message
        assert peer.reasons[sid] == "SHUTTING_DOWN"
        peer.close()  # (h2 takes no frame after a GOAWAY, so it cannot answer the ping gRPC's stop sends with it)
        stopping.join(20)
        assert time.monotonic() - start < 5  # a second's wait and the drain's quiet second, not the grace period
    finally:
        peer.close()
        st.stop()
