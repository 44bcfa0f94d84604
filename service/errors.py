"""Domain errors, raised anywhere in the service and mapped to gRPC status codes in one place.

As in KServe's server: the layers below the transport raise what went wrong in their own
terms; ``status_for`` decides what the client is told. Anything else is INTERNAL with a
generic message, its details logged (under an id the servicer adds to the message).

Each error the server's own code answers also says why in a word a program can act on: its reason,
sent to the client as a google.rpc.ErrorInfo (Google's API design guide, AIP-193), counted by
``attnserve_errors_total`` and written in the access log. A code says what kind of failure it was;
the reason, which of the server's limits or checks it was, where one code covers several
(RESOURCE_EXHAUSTED: a full queue, a client's own rate, the server's bound of calls, ...).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2

# ErrorInfo's domain: what the reasons below belong to
DOMAIN = "attnserve"

# The reasons, UPPER_SNAKE_CASE as AIP-193 has them. README's table of them says what each means and
# what a client does about it; a test holds the two to each other.
# the request: INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED
INVALID_INPUT = "INVALID_INPUT"  # a field's value (the BadRequest beside it names the field)
MALFORMED_REQUEST = "MALFORMED_REQUEST"  # bytes that are not the method's request message
NO_REQUEST = "NO_REQUEST"  # the call ended before one whole request message came
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"  # a probe's request (health, reflection, v2 metadata) past its bound
MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # a model name or version this server does not have
METHOD_NOT_SERVED = "METHOD_NOT_SERVED"  # a v2 method attnserve does not implement
SERVICE_NOT_FOUND = "SERVICE_NOT_FOUND"  # a health check for a service name this server does not answer for
# the caller: UNAUTHENTICATED, and RESOURCE_EXHAUSTED for a client's own limits
API_KEY_MISSING = "API_KEY_MISSING"  # no 'authorization: Bearer <key>'
API_KEY_INVALID = "API_KEY_INVALID"  # a key the server does not accept
CLIENT_CALLS_IN_PROGRESS = "CLIENT_CALLS_IN_PROGRESS"  # max_calls_per_client
CLIENT_CALL_RATE = "CLIENT_CALL_RATE"  # client_calls_per_second
CLIENT_TOKEN_RATE = "CLIENT_TOKEN_RATE"  # client_tokens_per_second
CLIENT_ATTENTION_BYTES = "CLIENT_ATTENTION_BYTES"  # a client's share of max_attention_bytes (servicer.CLIENT_SHARE)
# the server's bounds: RESOURCE_EXHAUSTED
CALLS_AT_LIMIT = "CALLS_AT_LIMIT"  # max_concurrent_calls
STREAMS_AT_LIMIT = "STREAMS_AT_LIMIT"  # max_probe_streams (health's Watch, reflection's stream)
QUEUE_FULL = "QUEUE_FULL"  # a batcher's or the generation queue's bound
QUEUE_TOO_LONG = "QUEUE_TOO_LONG"  # the wait ahead would use up most of the call's deadline
ATTENTION_BYTES_AT_LIMIT = "ATTENTION_BYTES_AT_LIMIT"  # max_attention_bytes
REQUEST_NOT_SENT = "REQUEST_NOT_SENT"  # at a full bound, the call that waited longest for its request
IDLE_STREAM = "IDLE_STREAM"  # at a full bound, the v2 stream with no request in progress for the longest
# time: DEADLINE_EXCEEDED
REQUEST_READ_TIMEOUT = "REQUEST_READ_TIMEOUT"  # no whole request within request_read_timeout_seconds
STREAM_NOT_READ = "STREAM_NOT_READ"  # the client took no message of its stream in stream_write_timeout_seconds
DEADLINE_PASSED = "DEADLINE_PASSED"  # the caller's deadline passed before the model ran the request
# the server's state: UNAVAILABLE (retry, elsewhere or later)
MODEL_LOADING = "MODEL_LOADING"
SHUTTING_DOWN = "SHUTTING_DOWN"
GENERATION_UNAVAILABLE = "GENERATION_UNAVAILABLE"  # no generation on this server, or its loop stopped
# the server's own fault: INTERNAL (ErrorInfo's metadata carries errorId, the id the server logged it under)
INTERNAL_ERROR = "INTERNAL_ERROR"

REASONS = (
    *(INVALID_INPUT, MALFORMED_REQUEST, NO_REQUEST, REQUEST_TOO_LARGE, MODEL_NOT_FOUND, METHOD_NOT_SERVED),
    SERVICE_NOT_FOUND,
    *(API_KEY_MISSING, API_KEY_INVALID, CLIENT_CALLS_IN_PROGRESS, CLIENT_CALL_RATE, CLIENT_TOKEN_RATE),
    CLIENT_ATTENTION_BYTES,
    *(CALLS_AT_LIMIT, STREAMS_AT_LIMIT, QUEUE_FULL, QUEUE_TOO_LONG, ATTENTION_BYTES_AT_LIMIT),
    *(REQUEST_NOT_SENT, IDLE_STREAM, REQUEST_READ_TIMEOUT, STREAM_NOT_READ, DEADLINE_PASSED),
    *(MODEL_LOADING, SHUTTING_DOWN, GENERATION_UNAVAILABLE, INTERNAL_ERROR),
)


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason = INTERNAL_ERROR

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidInput(ServiceError):
    """The request cannot be served as asked; the message names the field and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = INVALID_INPUT


class NotFound(ServiceError):
    """The request names a model or version this server does not have."""

    code = grpc.StatusCode.NOT_FOUND
    reason = MODEL_NOT_FOUND


class Overloaded(ServiceError):
    """The queue is full: refused at once so the client can back off or go elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = QUEUE_FULL


class ModelNotReady(ServiceError):
    """The model is still loading or warming up, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = MODEL_LOADING


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the model ran the request."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = DEADLINE_PASSED


INTERNAL_MESSAGE = "internal error; the server logged the details"

# The most characters of a status message. gRPC sends it in a trailer, percent-encoded (a character
# outside printable ASCII takes up to 12 bytes), and clients refuse trailers over 8-16 KiB: a message
# that echoed a long input (a model name, a list of out-of-range values) reached the client as
# RESOURCE_EXHAUSTED "Stream removed", not as the error it was. 512 characters stay under 8 KiB.
MAX_MESSAGE_CHARS = 512


def bounded(message: str) -> str:
    """message, cut to MAX_MESSAGE_CHARS with an ellipsis where it is longer."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "\u2026"


class Failure(NamedTuple):
    """What a client is told of a call that failed: its code, message and reason, and the ErrorInfo's
    metadata where there is any."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str] | None = None

    def trailers(self) -> tuple[tuple[str, bytes], ...]:
        return details(self.code, self.message, self.reason, metadata=self.metadata)


def status_for(exc: BaseException) -> Failure:
    """What the client is told of ``exc``."""
    if isinstance(exc, ServiceError):
        return Failure(exc.code, bounded(str(exc)), exc.reason)
    return Failure(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, INTERNAL_ERROR)


# the trailer that carries a google.rpc.Status with details, as Google's API design guide has it
DETAILS = "grpc-status-details-bin"
# The most bytes of that Status: it travels beside grpc-message (up to 6 KiB, percent-encoded, for
# MAX_MESSAGE_CHARS of four-byte characters) in base64, a third larger, and both stay under the 8 KiB
# of trailers a client takes without refusing some. One that would be larger is left out: the message
# says it all, the details being the same said again.
MAX_DETAILS_BYTES = 1024
# a message's part that names a field first: "texts[1]: must not be empty", "inputs[0].datatype: ..."
FIELD = re.compile(r"([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (.+)", re.S)


def details(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    retry_seconds: float | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[tuple[str, bytes], ...]:
    """The trailer ``grpc-status-details-bin`` for an error answered ``code`` with ``message`` for
    ``reason``: a google.rpc.Status of the same code and message with an ErrorInfo of the reason (and
    ``metadata``), a BadRequest naming each field the message names (INVALID_ARGUMENT), and a RetryInfo
    saying when to come back (``retry_seconds``), for clients that read them (grpcio-status'
    ``rpc_status.from_call``, Go's ``status.FromError(err).Details()``, Java's
    ``StatusProto.fromThrowable``). None where it would pass MAX_DETAILS_BYTES."""
    if retry_seconds is None and metadata is None:
        return _said(code, message, reason)
    return _details(code, message, reason, retry_seconds, metadata)


@functools.lru_cache(maxsize=256)
def _said(code: grpc.StatusCode, message: str, reason: str) -> tuple[tuple[str, bytes], ...]:
    """``details`` of an error with nothing of its own but its message: the refusals of a full server
    repeat theirs, and are the ones that come by the thousand (built: ~2.6 us; kept: ~0.2)."""
    return _details(code, message, reason, None, None)


def _details(
    code: grpc.StatusCode, message: str, reason: str, retry_seconds: float | None, metadata: dict[str, str] | None
) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violations: list[error_details_pb2.BadRequest.FieldViolation] = []
        for part in message.split("; "):  # several problems, each naming its field; or one whose text has a "; "
            if named := FIELD.fullmatch(part):
                violations.append(error_details_pb2.BadRequest.FieldViolation(field=named[1], description=named[2]))
            elif violations:
                violations[-1].description += f"; {part}"
            else:
                break
        if violations:
            status.details.add().Pack(error_details_pb2.BadRequest(field_violations=violations))
    if retry_seconds is not None:
        delay = Duration()
        delay.FromNanoseconds(round(retry_seconds * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    said = status.SerializeToString()
    return ((DETAILS, said),) if len(said) <= MAX_DETAILS_BYTES else ()
