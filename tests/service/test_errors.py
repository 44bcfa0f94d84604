"""The reasons errors are answered with (service.errors): each one documented, and each said the same
way to every client, in a google.rpc.Status's ErrorInfo."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from google.rpc import error_details_pb2, status_pb2

from service import errors
from service.errors import REASONS, Failure, InvalidInput, ModelNotReady, Overloaded, details, status_for
from tests.service.test_server import detail, reason_of

README = Path(__file__).resolve().parents[2] / "README.md"


def said(trailers: tuple[tuple[str, bytes], ...]) -> status_pb2.Status:
    ((key, raw),) = trailers
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(raw)


def test_every_reason_is_in_the_readme_table_with_its_code_and_no_other_is() -> None:
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([A-Z_]+) \|", README.read_text(), re.M)
    assert [r for r, _ in rows] == list(REASONS)  # in the same order, each once
    assert len(set(REASONS)) == len(REASONS)
    for name, code in rows:
        assert grpc.StatusCode[code], name
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", r) for r in REASONS)  # UPPER_SNAKE_CASE, as AIP-193 has them


def test_each_reason_is_answered_somewhere_in_the_service() -> None:
    """A reason in the table that nothing answers would be a promise kept by no code."""
    source = "\n".join(p.read_text() for p in (Path(errors.__file__).parent).glob("*.py") if p.name != "errors.py")
    implied = {InvalidInput.reason, Overloaded.reason, ModelNotReady.reason, errors.NotFound.reason}
    implied |= {errors.DeadlineExceeded.reason, errors.ServiceError.reason}  # the classes' own
    for name in REASONS:
        assert name in implied or re.search(rf"\b{name}\b", source), name


def test_an_error_carries_its_reason_and_what_else_it_has_to_say() -> None:
    status = said(details(grpc.StatusCode.INVALID_ARGUMENT, "texts[1]: must not be empty", errors.INVALID_INPUT))
    assert (status.code, status.message) == (3, "texts[1]: must not be empty")
    assert reason_of(status) == "INVALID_INPUT"
    bad = detail(status, error_details_pb2.BadRequest)
    assert bad is not None and [(v.field, v.description) for v in bad.field_violations] == [
        ("texts[1]", "must not be empty")
    ]
    # a refusal with a delay: ErrorInfo and RetryInfo
    status = said(details(grpc.StatusCode.RESOURCE_EXHAUSTED, "over", errors.CLIENT_CALL_RATE, 1.5))
    retry = detail(status, error_details_pb2.RetryInfo)
    assert reason_of(status) == "CLIENT_CALL_RATE" and retry is not None and retry.retry_delay.ToMilliseconds() == 1500
    # metadata: an internal error's id
    failed = Failure(grpc.StatusCode.INTERNAL, "internal error", errors.INTERNAL_ERROR, {"errorId": "ab12"})
    info = detail(said(failed.trailers()), error_details_pb2.ErrorInfo)
    assert info is not None and dict(info.metadata) == {"errorId": "ab12"} and info.domain == "attnserve"
    # a message that would take the Status past 1 KiB: none at all (the message says it all)
    assert details(grpc.StatusCode.NOT_FOUND, "\u00e9" * 512, errors.MODEL_NOT_FOUND) == ()


def test_the_reason_goes_with_the_error_raised() -> None:
    assert status_for(Overloaded("queue is full")).reason == "QUEUE_FULL"
    assert status_for(Overloaded("too long a wait", errors.QUEUE_TOO_LONG)).reason == "QUEUE_TOO_LONG"
    assert status_for(ModelNotReady("stopping", errors.SHUTTING_DOWN))[:3] == (
        grpc.StatusCode.UNAVAILABLE,
        "stopping",
        "SHUTTING_DOWN",
    )
    internal = (grpc.StatusCode.INTERNAL, errors.INTERNAL_MESSAGE, "INTERNAL_ERROR", None)
    assert status_for(KeyError("a defect")) == internal
