"""Domain errors, raised anywhere in the service and mapped to gRPC status codes in one place.

As in KServe's server: the layers below the transport raise what went wrong in their own
terms; ``status_for`` decides what the client is told. Anything else is INTERNAL with a
generic message, its details logged (under an id the servicer adds to the message).
"""

from __future__ import annotations

import re

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(ServiceError):
    """The request cannot be served as asked; the message names the field and why."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """The request names a model or version this server does not have."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """The queue is full: refused at once so the client can back off or go elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelNotReady(ServiceError):
    """The model is still loading or warming up, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the model ran the request."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


INTERNAL_MESSAGE = "internal error; the server logged the details"

# The most characters of a status message. gRPC sends it in a trailer, percent-encoded (a character
# outside printable ASCII takes up to 12 bytes), and clients refuse trailers over 8-16 KiB: a message
# that echoed a long input (a model name, a list of out-of-range values) reached the client as
# RESOURCE_EXHAUSTED "Stream removed", not as the error it was. 512 characters stay under 8 KiB.
MAX_MESSAGE_CHARS = 512


def bounded(message: str) -> str:
    """message, cut to MAX_MESSAGE_CHARS with an ellipsis where it is longer."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "\u2026"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, bounded(str(exc))
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


# the trailer that carries a google.rpc.Status with details, as Google's API design guide has it
DETAILS = "grpc-status-details-bin"
# The most bytes of that Status: it travels beside grpc-message (up to 6 KiB, percent-encoded, for
# MAX_MESSAGE_CHARS of four-byte characters) in base64, a third larger, and both stay under the 8 KiB
# of trailers a client takes without refusing some. One that would be larger is left out: the message
# says it all, the details being the same said again.
MAX_DETAILS_BYTES = 1024
# a message's part that names a field first: "texts[1]: must not be empty", "inputs[0].datatype: ..."
FIELD = re.compile(r"([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (.+)", re.S)


def details(code: grpc.StatusCode, message: str, retry_seconds: float | None = None) -> tuple[tuple[str, bytes], ...]:
    """The trailer ``grpc-status-details-bin`` for an error answered ``code`` with ``message``, where
    there is more to say than the message: a google.rpc.Status of the same code and message with a
    BadRequest naming each field the message names (INVALID_ARGUMENT), or a RetryInfo saying when to
    come back (``retry_seconds``), for clients that read them (grpcio-status' ``rpc_status.from_call``,
    Go's ``status.FromError(err).Details()``, Java's ``StatusProto.fromThrowable``). Else none."""
    if code is not grpc.StatusCode.INVALID_ARGUMENT and retry_seconds is None:
        return ()  # (nothing more to say: the refusals of a full server, among others, cost nothing here)
    status = status_pb2.Status(code=code.value[0], message=message)
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
    return ((DETAILS, said),) if status.details and len(said) <= MAX_DETAILS_BYTES else ()
