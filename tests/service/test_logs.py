"""The process's log, as text or as one JSON object a line, chosen by a flag or the environment."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.cli import build_parser, main
from service.logs import configure


@pytest.fixture
def root() -> Iterator[logging.Logger]:
    """The root logger, given back as it was (pytest's own handlers on it included)."""
    logger = logging.getLogger()
    handlers, level = logger.handlers[:], logger.level
    yield logger
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
