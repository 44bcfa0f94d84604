"""A model directory changed while serving: loaded beside the model serving, which finishes the calls
it began and then stops; one that cannot be loaded leaves the model before serving."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.reliability import point
from bench.timing import start_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service.config import ServerConfig
from service.model_dir import state
from service.runtime import ModelDirError
from service.scheduler import Scheduler
from service.servicer import Loaded
from tests.reliability.conftest import NOT_SERVING, SERVING, health
from tests.service.conftest import ServerThread, config, wait_for
from tests.service.test_kserve import infer, output
from tests.service.test_server import metrics, reason

TEXT = "To be, or not to be, that is the question"


def copy(model_dir: Path, into: Path, version: str, int8: bool = False) -> Path:
    """A copy of ``model_dir`` as ``version``; ``int8``: another model, its encoder and decoders the
    int8 graphs under the fp32 graphs' names, so that its embeddings differ from the first's."""
    shutil.copytree(model_dir, into)
    cfg = json.loads((into / "config.json").read_text())
    cfg["version"] = version
    for graph in ("encode", "decoder", "decoder_step") if int8 else ():
        cfg["graphs"][graph] = cfg["graphs"][f"{graph}_int8"]
    (into / "config.json").write_text(json.dumps(cfg))
    return into


@pytest.fixture
def models(model_dir: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the link the server is given, the first model, the second)."""
    one = copy(model_dir, tmp_path / "v1", "1")
    two = copy(model_dir, tmp_path / "v2", "2", int8=True)
    link = tmp_path / "current"
    point(link, one)
    return link, one, two


@pytest.fixture
def st(models: tuple[Path, Path, Path]) -> Iterator[ServerThread]:
    server = ServerThread(config(models[0])).start()
    yield server
    server.stop()


def hold_steps(server: ServerThread, after: int = 2) -> threading.Event:
    """Make the generation loop of the model serving now wait, before each decode step past its
    next ``after``, until the event returned is set: a generation on it stays in progress, its
    first tokens sent, until the test lets it go on."""
    runtime = server.server.scheduler.runtime  # type: ignore[union-attr]
    step = runtime.decode_step
    go_on = threading.Event()
    steps = iter(range(after))

    def held(*args: object) -> object:
        if next(steps, None) is None:
            go_on.wait(30)
        return step(*args)

    runtime.decode_step = held  # type: ignore[method-assign]
    return go_on


def version(stub: pb_grpc.AttnServeStub) -> str:
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).version


def embedding(stub: pb_grpc.AttnServeStub) -> np.ndarray:
    return np.array(stub.Encode(pb.EncodeRequest(texts=[TEXT]), timeout=30).embeddings[0].values)


def reloads(server: ServerThread) -> tuple[float, float, float]:
    """(loaded, rejected, attnserve_model_dir_rejected)."""
    m = metrics(server)
    return (
        m[("attnserve_model_reloads_total", (("outcome", "loaded"),))],
        m[("attnserve_model_reloads_total", (("outcome", "rejected"),))],
        m[("attnserve_model_dir_rejected", ())],
    )


def test_a_new_model_serves_the_calls_after_it_and_the_one_before_ends_those_it_began(
    st: ServerThread, models: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    link, _, two = models
    stub = st.stub()
    caplog.set_level(logging.INFO, "service.server")
    first = embedding(stub)
    greedy = pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=40, temperature=0)
    expected = stub.Generate(greedy, timeout=60)
    assert version(stub) == "1" and expected.usage.generated_tokens == 40

    # a generation streaming on the first model when the second comes
    go_on = hold_steps(st)
    messages: queue.Queue[pb.GenerateStreamResponse | BaseException] = queue.Queue()

    def read() -> None:
        try:
            for message in stub.GenerateStream(greedy, timeout=60):
                messages.put(message)
        except grpc.RpcError as e:
            messages.put(e)

    reader = threading.Thread(target=read)
    reader.start()
    head = messages.get(timeout=30)
    assert isinstance(head, pb.GenerateStreamResponse)
    old = st.server.servicer.loaded
    assert isinstance(old, Loaded) and old.users == 1

    point(link, two)
    st.call(st.server.reload_model(asked=True))
    new = st.server.servicer.loaded
    assert new is not old and isinstance(new, Loaded) and old.retired
    assert version(stub) == "2" and st.server.engine is new.engine
    second = embedding(stub)
    assert not np.allclose(first, second, atol=1e-5)  # another model's answer
    np.testing.assert_allclose(first, second, atol=0.5)  # (the same weights, quantized)
    assert reloads(st) == (1, 0, 0)
    info = {k: v for (name, k), v in metrics(st).items() if name == "attnserve_model_info"}
    assert info == {(("name", "tiny"), ("version", "2")): 1.0}

    # the stream goes on where it began, on the first model, and ends as the unary call did
    assert not old.idle.is_set() and old.scheduler.running and not new.scheduler.running
    go_on.set()
    rest = []
    while not rest or not rest[-1].finish_reason:
        message = messages.get(timeout=60)
        assert isinstance(message, pb.GenerateStreamResponse), message
        rest.append(message)
    reader.join(30)
    streamed = [head, *rest]
    assert "".join(m.text for m in streamed) == expected.text
    assert [t.token_id for m in streamed for t in m.tokens] == [t.token_id for t in expected.tokens]

    # then the first model stops: its batchers and its generation loop end
    assert wait_for(lambda: old.idle.is_set() and not old.scheduler._thread.is_alive())  # type: ignore[union-attr]
    assert wait_for(lambda: not any(t.is_alive() for t in old.engine.encode_threads._threads))
    said = [r.getMessage() for r in caplog.records]
    assert any("serving tiny 2 from" in m and "tiny 1 serves its 1 call(s) in progress" in m for m in said), said
    assert wait_for(lambda: any("tiny 1 stopped: its last call has ended" in r.getMessage() for r in caplog.records))
    np.testing.assert_allclose(embedding(stub), second, atol=1e-6)
    assert stub.Generate(greedy, timeout=60).usage.generated_tokens == 40


def test_a_directory_that_cannot_be_loaded_leaves_the_model_before_serving(
    st: ServerThread, models: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link, one, two = models
    stub = st.stub()
    caplog.set_level(logging.INFO, "service.server")
    first = embedding(stub)
    broken = tmp_path / "broken"
    shutil.copytree(two, broken)
    (broken / "encode_int8.onnx").write_bytes(b"half a graph")  # as a copy cut off

    point(link, broken)
    st.call(st.server.reload_model(asked=True))
    assert version(stub) == "1" and reloads(st) == (0, 1, 1)
    np.testing.assert_allclose(embedding(stub), first, atol=1e-6)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "model directory not loaded" in errors[0] and "still serving tiny 1" in errors[0]
    assert "encode_int8.onnx" in errors[0], errors  # what was wrong with it

    st.call(st.server.reload_model())  # looked at again, unchanged: not loaded again, nor said again
    assert reloads(st) == (0, 1, 1)
    (tmp_path / "gone").mkdir()
    point(link, tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # a link to nothing
    st.call(st.server.reload_model())
    assert reloads(st) == (0, 2, 1) and version(stub) == "1"
    assert "cannot be read" in [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR][-1]

    point(link, two)  # mended
    st.call(st.server.reload_model(asked=True))
    assert version(stub) == "2" and reloads(st) == (1, 2, 0)
    point(link, one)  # and back: the directory it came from, still whole
    st.call(st.server.reload_model(asked=True))
    assert version(stub) == "1" and reloads(st) == (2, 2, 0)
    np.testing.assert_allclose(embedding(stub), first, atol=1e-6)
    caplog.clear()
    st.call(st.server.reload_model(asked=True))  # unchanged
    assert reloads(st) == (2, 2, 0)
    assert any("model directory unchanged: serving tiny 1" in r.getMessage() for r in caplog.records)


def test_a_directory_whose_graph_was_damaged_in_place_is_refused_by_its_digest(
    st: ServerThread, models: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A byte changed in a graph, its size the same: ONNX Runtime would load it and serve weights
    export never checked; the digest export recorded refuses it."""
    link, one, _ = models
    damaged = copy(one, tmp_path / "damaged", "3")
    graph = damaged / "encode.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0x40  # in the weights, near the end
    graph.write_bytes(bytes(data))
    point(link, damaged)
    st.call(st.server.reload_model(asked=True))
    assert version(st.stub()) == "1" and reloads(st) == (0, 1, 1)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("encode.onnx: not the bytes export wrote" in m and "still serving tiny 1" in m for m in errors), errors


def test_with_digests_required_a_directory_whose_record_was_taken_out_is_refused(
    models: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can change a graph can also take its digest out of config.json, which an older export
    lacks too: with require_model_digests such a directory is refused, at start and on a reload."""
    link, one, _ = models
    bare = copy(one, tmp_path / "bare", "3")
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["files"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="records no file digests, and they are required"):
        ServerThread(config(bare, require_model_digests=True)).start()
    st = ServerThread(config(link, require_model_digests=True)).start()
    try:
        point(link, bare)
        st.call(st.server.reload_model(asked=True))
        assert version(st.stub()) == "1" and reloads(st) == (0, 1, 1)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("records no file digests" in m and "still serving tiny 1" in m for m in errors), errors
    finally:
        st.stop()


def test_the_directory_is_looked_at_every_model_reload_seconds_and_taken_once_settled(
    models: tuple[Path, Path, Path],
) -> None:
    link, one, two = models
    server = ServerThread(config(link, model_reload_seconds=0.05)).start()
    try:
        stub = server.stub()
        assert version(stub) == "1"
        point(link, two)
        assert wait_for(lambda: version(stub) == "2")
        assert reloads(server) == (1, 0, 0)

        # a directory that changes at every look is not taken until it stops
        writing = threading.Event()

        def keep_writing() -> None:
            n = 0
            while not writing.is_set():
                (one / "notes.txt").write_text(f"copying {n}")
                n += 1
                writing.wait(0.2)

        point(link, one)
        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            writing.wait(2.5)  # more than two settling seconds' looks
            assert version(stub) == "2" and reloads(server) == (1, 0, 0)
        finally:
            writing.set()
            writer.join()
        assert wait_for(lambda: version(stub) == "1")
        assert reloads(server) == (2, 0, 0)

        # replaced as attnserve export replaces its --out: removed, and another renamed in its place
        work = copy(two, one.parent / "work", "3")
        shutil.rmtree(one)
        threading.Event().wait(0.3)  # looked at meanwhile: missing, but not for a second
        work.rename(one)
        assert wait_for(lambda: version(stub) == "3")
        assert reloads(server) == (3, 0, 0)
    finally:
        server.stop()


def test_a_v2_stream_open_across_a_new_model_serves_each_request_on_the_model_when_it_came(
    st: ServerThread, models: tuple[Path, Path, Path]
) -> None:
    """A tritonclient stream stays open for good: it must not hold the first model for its lifetime."""
    link, _, two = models
    stub = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address))
    requests: queue.Queue[object] = queue.Queue()
    responses = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
    requests.put(infer("attnserve-encode", [TEXT]))
    before = next(responses)
    assert not before.error_message and before.infer_response.model_version == "1"
    old = st.server.servicer.loaded
    point(link, two)
    st.call(st.server.reload_model(asked=True))
    assert wait_for(lambda: old is not None and old.idle.is_set())  # the stream holds it no longer
    requests.put(infer("attnserve-encode", [TEXT]))
    after = next(responses)
    assert not after.error_message and after.infer_response.model_version == "2"
    assert not np.allclose(output(before.infer_response, "EMBEDDING"), output(after.infer_response, "EMBEDDING"))
    requests.put(None)
    assert list(responses) == []


def swapped_under_a_stream(
    st: ServerThread, models: tuple[Path, Path, Path]
) -> tuple[Iterator[pb.GenerateStreamResponse], pb.GenerateStreamResponse, Loaded, threading.Event]:
    """A generation of 40 tokens streaming on the first model, held after its first, and the second
    model loaded meanwhile: the stream, its first message, the first model, and what lets it go on."""
    link, _, two = models
    go_on = hold_steps(st)
    request = pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=40, temperature=0)
    stream = st.stub().GenerateStream(request, timeout=60)
    head = next(stream)
    old = st.server.servicer.loaded
    point(link, two)
    st.call(st.server.reload_model(asked=True))
    assert old is not None and old.retired and not old.idle.is_set()
    return stream, head, old, go_on


def test_stopping_while_a_replaced_model_still_serves_ends_both(
    st: ServerThread, models: tuple[Path, Path, Path]
) -> None:
    stream, head, old, go_on = swapped_under_a_stream(st, models)
    threading.Timer(0.5, go_on.set).start()
    st.stop(grace=10)  # the stream is let finish, then both models stop
    rest = list(stream)
    assert len(head.tokens) + sum(len(m.tokens) for m in rest) == 40
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert old.idle.is_set() and not old.scheduler._thread.is_alive()  # type: ignore[union-attr]
    assert not st.server.scheduler._thread.is_alive()  # type: ignore[union-attr]


def test_sighup_loads_a_changed_model_directory(models: tuple[Path, Path, Path]) -> None:
    link, _, two = models
    proc, port = start_server(link, "--model-reload-seconds", "0")
    stub = pb_grpc.AttnServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        assert version(stub) == "1"
        point(link, two)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: version(stub) == "2", 30)
        proc.send_signal(signal.SIGHUP)  # unchanged: said so, and still serving
        assert wait_for(lambda: proc.poll() is None and version(stub) == "2")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGHUP: reading the API keys file and the model directory again" in err
    assert "serving tiny 2 from" in err and "model directory unchanged: serving tiny 2" in err
    assert "tiny 1 stopped: its last call has ended" in err


def test_the_state_of_a_directory_names_where_it_resolves_and_each_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    (tmp_path / "a" / "sub").mkdir()  # not a file: not looked at
    point(tmp_path / "link", tmp_path / "a")
    seen = state(tmp_path / "link")
    assert seen[0] == str((tmp_path / "a").resolve()) and [f[:2] for f in seen[1]] == [("config.json", 2)]
    (tmp_path / "a" / "config.json").write_text("{ }")
    assert state(tmp_path / "link") != seen
    with pytest.raises(OSError):
        state(tmp_path / "nowhere")


def test_model_reload_seconds_must_not_be_negative(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="model_reload_seconds must be >= 0"):
        ServerConfig(model_dir=model_dir, model_reload_seconds=-1)


def test_every_way_a_call_ends_gives_its_model_back(st: ServerThread) -> None:
    """A call gives back the model it pinned however it ends: answered, refused for its input,
    cancelled by its client mid-stream, on either API. One that did not would hold a replaced model
    for ever."""
    stub = st.stub()
    v2 = v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(st.address))
    stub.Encode(pb.EncodeRequest(texts=[TEXT]), timeout=30)
    stub.AttentionMap(pb.AttentionMapRequest(text=TEXT), timeout=30)
    stub.Tokenize(pb.TokenizeRequest(texts=[TEXT]), timeout=30)
    version(stub)
    stub.Generate(pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=4), timeout=30)
    assert len(list(stub.GenerateStream(pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=4), timeout=30))) >= 1
    for bad in (
        lambda: stub.Encode(pb.EncodeRequest(texts=[""]), timeout=30),
        lambda: stub.AttentionMap(pb.AttentionMapRequest(text=TEXT, layers=[99]), timeout=30),
        lambda: stub.Generate(pb.GenerateRequest(prompt="ROMEO:", top_p=2.0), timeout=30),
        lambda: list(stub.GenerateStream(pb.GenerateRequest(prompt="ROMEO:", temperature=-1.0), timeout=30)),
        lambda: v2.ModelInfer(infer("attnserve-encode", [TEXT], pooling="nonsense"), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as e:
            bad()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    v2.ModelInfer(infer("attnserve-encode", [TEXT]), timeout=30)
    responses = list(v2.ModelStreamInfer(iter([infer("attnserve-encode", [TEXT]), infer("nowhere", [TEXT])])))
    assert sorted(bool(r.error_message) for r in responses) == [False, True]  # (as each is done)
    go_on = hold_steps(st, after=1)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=40), timeout=30)
    next(stream)
    stream.cancel()  # a client gone mid-stream
    go_on.set()
    loaded = st.server.servicer.loaded
    assert loaded is not None
    assert wait_for(lambda: st.server.guard.in_flight == 0 and loaded.users == 0), loaded.users


def test_a_stream_whose_client_stops_reading_and_goes_counts_cancelled_and_gives_its_model_back(
    st: ServerThread,
) -> None:
    """A client whose window is small stops reading, so the server waits in gRPC's write, then the
    client goes: the stream ends CANCELLED, and gives back its model."""
    channel = grpc.insecure_channel(
        st.address, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    )
    stub = pb_grpc.AttnServeStub(channel)

    def count(code: str) -> float:
        return metrics(st).get(("attnserve_requests_total", (("code", code), ("rpc", "GenerateStream"))), 0)

    cancelled, ok = count("CANCELLED"), count("OK")
    # each token with its 20 likeliest alternatives and where it attended, ~1 KB a message: a few fill
    # the window; and the generation is held after a few steps, so that it is in progress however
    # busy the machine (a stream generated whole at once may go out in one message and end)
    request = pb.GenerateRequest(
        prompt="the king", max_new_tokens=48, temperature=1.0, seed=7, logprobs=True, top_logprobs=20,
        return_attention=True,
    )  # fmt: skip
    go_on = hold_steps(st, after=4)
    stream = stub.GenerateStream(request, timeout=30)
    assert len(next(stream).tokens) >= 1
    loaded = st.server.servicer.loaded
    assert loaded is not None
    threading.Event().wait(0.5)  # what was generated waits on a window the client does not open
    assert loaded.users == 1
    stream.cancel()
    go_on.set()
    assert wait_for(lambda: count("CANCELLED") == cancelled + 1), (count("CANCELLED"), count("OK"))
    assert count("OK") == ok and wait_for(lambda: loaded.users == 0)
    channel.close()


# --- a generation loop that dies ----------------------------------------------------------------

GREEDY = pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=12, temperature=0)


def kill_generation(scheduler: Scheduler | None) -> Scheduler:
    """End ``scheduler``'s generation loop as a fault past its every ``except Exception`` would."""
    assert scheduler is not None

    def die() -> bool:
        raise SystemExit("the loop is gone")

    scheduler._iterate = die  # type: ignore[method-assign]
    scheduler._wake.set()
    assert wait_for(lambda: scheduler.dead)
    return scheduler


def deaths(server: ServerThread) -> float:
    return metrics(server)[("attnserve_generation_loop_deaths_total", ())]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's death, on purpose
def test_a_generation_loop_that_dies_is_loaded_anew_and_health_comes_back(
    st: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica mends itself in a second rather than waiting, NOT_SERVING, for its liveness probe
    to restart it, which would reload the model from its image and drop every other call."""
    caplog.set_level(logging.INFO, "service.server")
    stub = st.stub()
    expected = stub.Generate(GREEDY, timeout=60)
    dead = kill_generation(st.server.scheduler)
    old = st.server.servicer.loaded
    assert wait_for(lambda: st.server.scheduler is not dead and health(st.address) == SERVING)
    assert stub.Generate(GREEDY, timeout=60).text == expected.text and version(stub) == "1"
    assert reloads(st) == (1, 0, 0) and deaths(st) == 1 and metrics(st)[("attnserve_ready", ())] == 1
    assert old is not None and wait_for(lambda: old.idle.is_set())  # and the dead one was stopped
    said = [r.getMessage() for r in caplog.records]
    down = next(i for i, m in enumerate(said) if "generation is down" in m)
    assert any("loading it anew" in m for m in said[down:]), said
    assert any("generation is back: serving tiny 1" in m for m in said[down:]), said


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_loop_that_dies_again_within_a_minute_is_left_down_until_asked(st: ServerThread) -> None:
    """A model whose loop dies again soon after it was loaded anew would be loaded over and over:
    it is left NOT_SERVING (its probe restarts it) unless SIGHUP asks."""
    stub = st.stub()
    first = kill_generation(st.server.scheduler)
    assert wait_for(lambda: st.server.scheduler is not first and health(st.address) == SERVING)
    second = kill_generation(st.server.scheduler)
    assert wait_for(lambda: health(st.address) == NOT_SERVING)
    st.call(st.server.reload_model())  # a periodic look, unchanged directory: left down
    assert st.server.scheduler is second and health(st.address) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(GREEDY, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and reason(e.value) == "GENERATION_UNAVAILABLE"
    st.call(st.server.reload_model(asked=True))  # SIGHUP
    assert st.server.scheduler is not second and health(st.address) == SERVING
    assert stub.Generate(GREEDY, timeout=60).usage.generated_tokens == 12
    assert reloads(st) == (2, 0, 0) and deaths(st) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_loop_of_a_replaced_model_dying_leaves_health_and_the_model_serving_alone(
    st: ServerThread, models: tuple[Path, Path, Path]
) -> None:
    stream, _, old, go_on = swapped_under_a_stream(st, models)
    new = st.server.servicer.loaded
    stub = st.stub()
    old.scheduler._iterate = lambda: (_ for _ in ()).throw(SystemExit("the loop is gone"))  # type: ignore[method-assign]
    go_on.set()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and reason(e.value) == "GENERATION_UNAVAILABLE"
    assert old.scheduler.dead and wait_for(lambda: old.idle.is_set() and deaths(st) == 1)
    st.call(asyncio.sleep(0.2))  # what the death hands to the event loop has run
    assert health(st.address) == SERVING and st.server.servicer.loaded is new and reloads(st) == (1, 0, 0)
    assert stub.Generate(GREEDY, timeout=60).usage.generated_tokens == 12 and version(stub) == "2"
