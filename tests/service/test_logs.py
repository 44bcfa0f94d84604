"""The process's log, as text or as one JSON object a line, chosen by a flag or the environment, written
off the thread that logs; and the access log."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.timing import start_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2 as v2
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service import logs
from service.cli import build_parser, main
from service.config import ServerConfig
from service.logs import configure, flush
from tests.reliability.conftest import SERVING, health
from tests.service.conftest import ServerThread, config


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (pytest's own handlers on it included)."""
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    yield logger
    flush()
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_json_lines_carry_the_level_logger_trace_and_extras(root: logging.Logger) -> None:
    out = io.StringIO()
    configure("info", "json", out)
    log = logging.getLogger("service.servicer")
    log.debug("not at INFO")
    log.info("serving %s on %s", "tiny", "CPUExecutionProvider")
    try:
        raise RuntimeError("device lost\nits mind")  # a line break inside one record
    except RuntimeError as e:
        log.error("Encode failed", exc_info=e, extra={"error_id": "00ff", "request_id": 'a"b'})
    flush()  # written by a thread of their own: all of them, now
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["message"] == "serving tiny on CPUExecutionProvider"
    assert (first["level"], first["logger"]) == ("INFO", "service.servicer")
    assert first["time"].endswith("+00:00")  # ISO 8601, UTC
    assert second["level"] == "ERROR" and (second["error_id"], second["request_id"]) == ("00ff", 'a"b')
    assert "Traceback" in second["exc_info"] and "device lost\nits mind" in second["exc_info"]


def test_text_is_one_line_a_record(root: logging.Logger) -> None:
    out = io.StringIO()
    configure("WARNING", "text", out)
    logging.getLogger("service.server").info("not at WARNING")
    logging.getLogger("service.server").warning("grace period over with %d calls in progress", 3)
    flush()
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" WARNING service.server: grace period over with 3 calls in progress")


def test_the_format_and_level_come_from_flags_then_the_environment(
    root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = build_parser().parse_args(["client", "info"])
    assert (args.log_level, args.log_format) == ("INFO", "text")
    monkeypatch.setenv("ATTNSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("ATTNSERVE_LOG_LEVEL", "warning")
    args = build_parser().parse_args(["client", "info"])
    assert (args.log_level, args.log_format) == ("WARNING", "json")
    args = build_parser().parse_args(["--log-format", "text", "--log-level", "debug", "client", "info"])
    assert (args.log_level, args.log_format) == ("DEBUG", "text")
    with pytest.raises(ValueError, match="log level: 'loud'"):
        configure("loud", "text")
    with pytest.raises(ValueError, match="log format: 'xml'"):
        configure("INFO", "xml")


def test_a_value_from_the_environment_that_is_not_one_is_a_usage_error(
    root: logging.Logger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse checks only what comes as flags: a bad value from the environment is caught after it."""
    monkeypatch.setenv("ATTNSERVE_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as e:
        main(["client", "info"])
    assert e.value.code == 2 and "log format: 'xml' is not one of text, json" in capsys.readouterr().err


class Stalled(io.StringIO):
    """A stream whose reader stopped: a write waits until ``going`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.going = threading.Event()
        self.waiting = threading.Event()  # a write is waiting

    def write(self, s: str) -> int:
        self.waiting.set()
        self.going.wait()
        return super().write(s)


def test_a_stalled_stream_stops_no_one_that_logs_and_what_overflows_is_counted_then_said(
    root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records are written by a thread of their own: a stderr nobody reads (a full pipe) holds that
    thread, never the event loop that logged them. Past QUEUED waiting, records are dropped and counted."""
    monkeypatch.setattr(logs, "QUEUED", 10)
    out = Stalled()
    configure("INFO", "text", out)
    log = logging.getLogger("service.servicer")
    before = logs.dropped()
    log.info("record 0")
    assert out.waiting.wait(5)  # the writer holds record 0, stuck in the write

    def flood() -> None:
        for i in range(1, 26):
            log.info("record %d", i)

    logger = threading.Thread(target=flood)
    logger.start()
    logger.join(5)
    assert not logger.is_alive(), "logging waited on the stream"
    assert logs.dropped() - before == 15  # 10 waited in the queue, 15 found it full
    out.going.set()
    flush()
    lines = out.getvalue().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines if "record" in line.rsplit(": ", 1)[1]][:11] == [
        f"record {i}" for i in range(11)
    ]
    assert any(" WARNING service.logs: 15 log record(s) dropped: stderr was not read" in line for line in lines)


# --- the access log ---------------------------------------------------------------------------------


def test_the_access_log_records_each_call_to_the_model_and_no_probe(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    st = ServerThread(config(model_dir, access_log=True)).start()
    caplog.set_level(logging.INFO, "attnserve.access")
    try:
        ch = grpc.insecure_channel(st.address)
        stub, v2_stub = pb_grpc.AttnServeStub(ch), v2_grpc.GRPCInferenceServiceStub(ch)
        trace = [("x-request-id", "req-1"), ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
        stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=trace, timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Encode(pb.EncodeRequest(texts=["hi"] * 65), timeout=30)
        list(stub.GenerateStream(pb.GenerateRequest(prompt="My lord", max_new_tokens=2), timeout=30))
        text = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
        text.contents.bytes_contents.append(b"the king")
        infer = v2.ModelInferRequest(model_name="attnserve-encode", inputs=[text])
        list(v2_stub.ModelStreamInfer(iter([infer]), metadata=[("x-request-id", "req-2")], timeout=30))
        raw = ch.unary_unary("/attnserve.v1.AttnServe/Encode")  # bytes that are no request: the guard answers
        with pytest.raises(grpc.RpcError):
            raw(b"\xff\xff\xff", timeout=30)
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)  # a probe: none
    finally:
        st.stop()
    records = [r for r in caplog.records if r.name == "attnserve.access"]
    seen = [(r.rpc, r.code, getattr(r, "request_id", None)) for r in records]  # type: ignore[attr-defined]
    assert seen == [
        ("Encode", "OK", "req-1"),
        ("Encode", "INVALID_ARGUMENT", None),
        ("GenerateStream", "OK", None),
        ("ModelStreamInfer", "OK", "req-2"),
        ("Encode", "INVALID_ARGUMENT", None),
    ]
    assert all(r.peer.startswith(("ipv4:127.0.0.1:", "ipv6:")) for r in records)  # type: ignore[attr-defined]
    assert all(r.duration_ms >= 0 and r.levelno == logging.INFO for r in records)  # type: ignore[attr-defined]
    assert "exceed the limit of 64" in records[1].detail  # type: ignore[attr-defined]
    assert "not a valid attnserve.v1.EncodeRequest" in records[4].detail  # type: ignore[attr-defined]
    assert not hasattr(records[0], "detail")
    # and why, in the word its client was sent (the servicer's refusal, and the guard's)
    assert (records[1].reason, records[4].reason) == ("INVALID_INPUT", "MALFORMED_REQUEST")  # type: ignore[attr-defined]
    assert " reason=MALFORMED_REQUEST: " in records[4].getMessage() and not hasattr(records[0], "reason")
    traced = (records[0].trace_id, records[0].span_id, records[0].trace_flags)  # type: ignore[attr-defined]
    assert traced == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    assert not hasattr(records[1], "trace_id")
    assert records[0].getMessage().startswith("Encode OK ") and "request_id='req-1'" in records[0].getMessage()


@pytest.mark.parametrize(
    "value",
    [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # an all-zero trace
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # an all-zero span
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the version no one may send
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n{"level": "CRITICAL"}',  # a record forged
    ],
)
def test_a_traceparent_not_of_the_standard_form_is_left_out(value: str) -> None:
    class Call:  # the two things of a call's context that caller reads
        def peer(self) -> str:
            return "ipv4:127.0.0.1:5000"

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("traceparent", value),)

    assert logs.caller(Call()) == {"peer": "ipv4:127.0.0.1:5000"}


def test_the_access_log_is_off_unless_asked(served: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "attnserve.access"):
        served.stub().Encode(pb.EncodeRequest(texts=["hi"]), timeout=30)
    assert not [r for r in caplog.records if r.name == "attnserve.access"]


def test_the_access_log_may_record_only_the_calls_not_answered_ok(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A busy server logs the calls worth a look, each with its reason, and nothing of the others."""
    st = ServerThread(config(model_dir, access_log=True, access_log_errors_only=True)).start()
    caplog.set_level(logging.INFO, "attnserve.access")
    try:
        stub = st.stub()
        stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=30)
        list(stub.GenerateStream(pb.GenerateRequest(prompt="My lord", max_new_tokens=2), timeout=30))
        with pytest.raises(grpc.RpcError):
            stub.Encode(pb.EncodeRequest(), timeout=30)  # the servicer's refusal
        with pytest.raises(grpc.RpcError):
            grpc.insecure_channel(st.address).unary_unary("/attnserve.v1.AttnServe/Encode")(b"\xff", timeout=30)
    finally:
        st.stop()
    records = [(r.rpc, r.code, r.reason) for r in caplog.records if r.name == "attnserve.access"]  # type: ignore[attr-defined]
    assert records == [
        ("Encode", "INVALID_ARGUMENT", "INVALID_INPUT"),
        ("Encode", "INVALID_ARGUMENT", "MALFORMED_REQUEST"),
    ]
    with pytest.raises(ValueError, match="access_log_errors_only needs access_log"):
        ServerConfig(access_log_errors_only=True)


def test_a_server_whose_stderr_nobody_reads_goes_on_serving(model_dir: Path) -> None:
    """Its log a pipe nobody reads, as under a log collector that stalled: past the pipe's 64 KB, a
    record written from the event loop would stop it, and every call with it. Its access log in JSON,
    as the Kubernetes manifests set it."""
    env = {**os.environ, "ATTNSERVE_LOG_FORMAT": "json"}
    proc, port = start_server(model_dir, "--access-log", env=env)
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.AttnServeStub(ch)
        for i in range(1000):  # ~250 bytes a record: ~250 KB
            stub.Encode(pb.EncodeRequest(texts=["hi"]), metadata=[("x-request-id", f"r{i}")], timeout=10)
        assert health(f"127.0.0.1:{port}") == SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    calls = [r for r in records if r["logger"] == "attnserve.access"]
    assert [r["request_id"] for r in calls] == [f"r{i}" for i in range(1000)]
    assert all(r["rpc"] == "Encode" and r["code"] == "OK" and r["level"] == "INFO" for r in calls)
    assert all(r["duration_ms"] > 0 and r["peer"].startswith("ipv4:127.0.0.1:") for r in calls)
