"""The process's log, as text or as one JSON object a line, chosen by a flag or the environment, written
off the thread that logs; and the access log."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from service import logs
from service.cli import build_parser, main
from service.logs import configure, flush


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
