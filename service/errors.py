"""Domain errors, raised anywhere in the service and mapped to gRPC status codes in one place.

As in KServe's server: the layers below the transport raise what went wrong in their own
terms; ``status_for`` decides what the client is told. Anything else is INTERNAL with a
generic message, its details logged (under an id the servicer adds to the message).
"""

from __future__ import annotations

import grpc


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
