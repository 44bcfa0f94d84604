"""The process's log on stderr: lines for a person at a terminal, or one JSON object a line for a log
pipeline (Loki, Elasticsearch, Cloud Logging), which then needs no pattern to find a record's level,
its logger or its traceback.

In JSON each record has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, then
``exc_info`` with the traceback where there is one, and whatever the record was given as ``extra``
(an internal error's ``error_id`` and ``rpc``, see ``service.servicer``, and an access record's,
``access``; both with the caller's, ``caller``).

Records are written by a thread of their own, never by the thread that logs: a stderr that its
reader stopped draining (a full pipe) would otherwise stop the event loop, health with it, at the
next record. They are written in WRITE_SECONDS' batches. At most QUEUED records wait to be written;
past that a record is dropped and counted (``dropped``, ``attnserve_log_records_dropped_total``),
and the writer says how many were dropped once it can write again.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUEUED = 10_000  # records waiting to be written, at most
WRITE_SECONDS = 0.05  # records are written this long after the first of them came, together
FLUSH_SECONDS = 5.0  # at exit, the most the records still queued are waited for

ACCESS = logging.getLogger("attnserve.access")


class Gatherer:
    """A thread that runs ``work`` ``seconds`` after ``poke`` is first called, on what came meanwhile,
    then waits for the next poke: woken at most once every ``seconds``, whatever the rate of pokes (a
    thread woken for each would cost its wake-up each). The log's writer and the tracer are ones."""

    def __init__(self, name: str, seconds: float, work: Callable[[], None]) -> None:
        self.seconds = seconds
        self.work = work
        self.woken = threading.Event()  # set by the first poke after the thread last looked
        self.armed = False
        self.ending = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def poke(self) -> None:
        if not self.armed:
            self.armed = True
            self.woken.set()

    def _run(self) -> None:
        while not self.ending:
            self.woken.wait()
            time.sleep(self.seconds)  # what comes meanwhile goes in the same work
            # in this order: what finds the thread armed is what the work below takes
            self.woken.clear()
            self.armed = False
            self.work()
        self.work()

    def end(self, timeout: float) -> None:
        """Run the work once more, on what is queued, and end: within ``timeout``."""
        self.ending = True
        self.woken.set()
        self.thread.join(timeout)


_dropped = 0  # records dropped for a full queue, since the process started
_dropped_lock = threading.Lock()  # (records are dropped by the threads that log them)
_current: _Writer | None = None


class _Writer(logging.Handler):
    """Takes records into a queue, and writes them to the stream from a thread of its own, what came in
    WRITE_SECONDS at once: so a record costs its logger no wait on the stream, nor the writer a
    wake-up each (woken for every record, the writer took 39-54 us of CPU a JSON record of the access
    log, on the server's one core under load; woken at most once every WRITE_SECONDS, 13-15). A
    record that finds QUEUED waiting is dropped and counted, and said once the writer writes again."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self.out = logging.StreamHandler(stream)  # formats, writes and flushes, on the writer's thread
        self.waiting: collections.deque[logging.LogRecord] = collections.deque()
        self.calls: collections.deque[Call] = collections.deque()  # the access log's, made records here
        self.said = _dropped  # drops said so far
        self.gatherer = Gatherer("log-writer", WRITE_SECONDS, self._write)
        self.thread = self.gatherer.thread

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self.out.setFormatter(fmt)

    def emit(self, record: logging.LogRecord) -> None:
        global _dropped
        if len(self.waiting) >= QUEUED:
            with _dropped_lock:
                _dropped += 1
            return
        # The message is made now (its arguments may change once this returns); the traceback is
        # formatted by the writer, which the JSON format needs apart from the message.
        record.msg = record.getMessage()
        record.args = None
        self.waiting.append(record)
        self.gatherer.poke()

    def note(self, call: Call) -> None:
        """Queue a call for the access log, its record made on the writer's thread."""
        global _dropped
        if len(self.calls) >= QUEUED:
            with _dropped_lock:
                _dropped += 1
            return
        self.calls.append(call)
        self.gatherer.poke()

    def _write(self) -> None:
        for _ in range(len(self.calls)):  # through the logger, into self.waiting (below)
            ACCESS.handle(_access_record(self.calls.popleft()))
        lines = []
        if _dropped > self.said:
            said = logging.LogRecord(__name__, logging.WARNING, __file__, 0, "", None, None)
            said.msg = f"{_dropped - self.said} log record(s) dropped: stderr was not read as fast as they came"
            self.said = _dropped
            lines.append(self.out.format(said))
        for _ in range(len(self.waiting)):
            record = self.waiting.popleft()
            try:
                lines.append(self.out.format(record))
            except Exception:
                self.out.handleError(record)
        if lines:
            with contextlib.suppress(Exception):  # the stream is gone: there is nothing left to say it on
                self.out.stream.write("\n".join(lines) + "\n")
                self.out.flush()

    def end(self, timeout: float) -> None:
        """Write what is queued and end the writer: within ``timeout`` (its stream may never be read again)."""
        self.gatherer.end(timeout)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) in ``fmt``, written
    by a thread of their own, in place of any handler it had."""
    global _current
    if level.upper() not in LEVELS:
        raise ValueError(f"log level: {level!r} is not one of {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ValueError(f"log format: {fmt!r} is not one of {', '.join(FORMATS)}")
    flush()
    writer = _Writer(stream)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        writer.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",
            )
        )
    else:
        writer.setFormatter(logging.Formatter(TEXT))
    _current = writer
    logging.basicConfig(level=level.upper(), handlers=[writer], force=True)


def flush() -> None:
    """Write every record queued, and end the writer (records logged after it go to logging's last
    resort, stderr, until the next ``configure``). At exit it runs by itself; before ``os._exit``, call it."""
    global _current
    if _current is not None:
        writer, _current = _current, None
        logging.getLogger().removeHandler(writer)
        writer.end(FLUSH_SECONDS)


atexit.register(flush)


def writer_thread() -> threading.Thread | None:
    """The thread that writes the records, where ``configure`` made one (for measuring what it costs)."""
    return _current.thread if _current is not None else None


def dropped() -> int:
    """Records dropped for a full queue, since the process started."""
    return _dropped


# The header a client, a proxy or a service mesh names a request with: logged with an internal
# error and in the access log, so that the client's record and the server's can be put side by side.
REQUEST_ID = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
# W3C Trace Context (what OpenTelemetry, service meshes and tracing proxies send): the trace a call
# belongs to, logged as trace_id and span_id (the caller's span), so that a tracing backend can lead
# from a trace to the server's records of it. A value not of the form is ignored, as the standard says.
TRACEPARENT = "traceparent"
TRACE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# the name of the client whose API key the call being served carried (service.guard), where keys are asked for
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)


def caller(context: Any) -> dict[str, str]:
    """A call's ``peer``, the ``client`` its API key names where keys are asked for, its
    ``request_id`` where it sent one (cut to MAX_REQUEST_ID_CHARS), and the ``trace_id``, ``span_id``
    and ``trace_flags`` of its ``traceparent`` where it sent a valid one, for a record."""
    said = {"peer": context.peer()}
    if (client := CLIENT.get()) is not None:
        said["client"] = client
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == REQUEST_ID and "request_id" not in said:
            said["request_id"] = value[:MAX_REQUEST_ID_CHARS]
        elif key == TRACEPARENT and "trace_id" not in said and (trace := TRACE.fullmatch(value.strip())):
            version, trace_id, span_id, flags = trace.groups()
            if version != "ff" and trace_id != "0" * 32 and span_id != "0" * 16:  # all invalid by the standard
                said["trace_id"], said["span_id"], said["trace_flags"] = trace_id, span_id, flags
    return said


# a call answered, for the access log: when, its method, status code, seconds taken, caller, what it was told and why
Call = tuple[float, str, str, float, dict[str, str], str, str]


def access(
    rpc: str,
    code: str,
    seconds: float,
    context: Any,
    detail: str = "",
    who: dict[str, str] | None = None,
    reason: str = "",
) -> None:
    """The access log's record of a call answered (``attnserve.access``, INFO): its method, status code,
    time from arrival to answer, caller (and the client its key names) and request id, and for a call not
    answered OK what it was told and why (its ErrorInfo reason). ``who``: the caller's fields (``caller``),
    where read already.

    Only what the call alone can give is taken here, on the event loop; the record is made on the
    writer's thread with the others come meanwhile (``bench observe``: made here, a JSON record took
    ~54 us of the event loop's CPU a call and ~15 of the writer's; made there, ~20 and ~22: records
    that lived 50 ms on the loop's side also made its garbage collections busier)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    call = (time.time(), rpc, code, seconds, caller(context) if who is None else who, detail, reason)
    writer = _current
    if writer is None:  # no writer (logging set up otherwise): at once
        ACCESS.handle(_access_record(call))
    else:
        writer.note(call)


def _access_record(call: Call) -> logging.LogRecord:
    when, rpc, code, seconds, who, detail, reason = call
    fields: dict[str, Any] = {"rpc": rpc, "code": code, "duration_ms": round(seconds * 1000, 3), **who}
    text = f"{rpc} {code} {fields['duration_ms']:.3f} ms {fields['peer']}"
    if "client" in fields:
        text += f" client={fields['client']}"
    if "request_id" in fields:
        text += f" request_id={fields['request_id']!r}"
    if "trace_id" in fields:
        text += f" trace_id={fields['trace_id']}"
    if reason:
        fields["reason"] = reason
        text += f" reason={reason}"
    if detail:
        fields["detail"] = detail
        text += f": {detail}"
    # made here, not by ACCESS.info: the record has no caller for logging to look for on the stack
    record = ACCESS.makeRecord(ACCESS.name, logging.INFO, "", 0, text, (), None, extra=fields)
    record.created, record.msecs = when, (when - int(when)) * 1000  # when the call was answered
    return record
