"""What every call goes through before a servicer sees it: parsing, enum checks, admission.

A gRPC server interceptor, so that one place covers every method of every service:

* Request bytes that do not parse (truncated, garbage, invalid UTF-8 in a string field) are
  answered INVALID_ARGUMENT with a plain message. Left to grpc, a failing deserializer
  becomes UNKNOWN with the exception's class in the message.
* Enum fields are proto3 open enums: any number parses. A value the schema does not name is
  refused here, for every request message alike, naming the field.
* Admission, for the services given as ``admitted`` (the model's, not health or reflection):
  at most ``max_concurrent`` calls at once, beyond that RESOURCE_EXHAUSTED at once; while
  the server drains for shutdown, UNAVAILABLE (which clients retry elsewhere). The guard
  counts the calls in flight, so shutdown can wait for them.

Health and reflection are never refused for load or shutdown: a probe must be answered
whatever the server is doing. Only their streams (health's Watch, reflection's), which stay open
and hold memory for as long as the client keeps them, are bounded: at most ``max_streams`` at
once, beyond that RESOURCE_EXHAUSTED; a health Check is always answered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.metrics import Metrics

log = logging.getLogger(__name__)


class Malformed:
    """What the tolerant deserializer returns for bytes that are not a valid message."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def tolerant(parse: Callable[[bytes], Any], name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, and whatever else a parser may raise on hostile bytes
            return Malformed(f"request is not a valid {name} message ({len(data)} bytes)")

    return deserialize


def enum_problem(msg: Message, prefix: str = "") -> str | None:
    """The first enum field, at any depth, holding a number its enum does not name."""
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        if fd.type == FieldDescriptor.TYPE_ENUM:
            values = value if fd.is_repeated else [value]
            for v in values:
                if v not in fd.enum_type.values_by_number:
                    return f"{path}: unknown value {v} (expected one of {sorted(fd.enum_type.values_by_number)})"
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
            for i, sub in enumerate(value if fd.is_repeated else [value]):
                found = enum_problem(sub, f"{path}[{i}]." if fd.is_repeated else f"{path}.")
                if found:
                    return found
    return None


def declared(method: str) -> bool:
    """Whether ``/service/Method`` is an RPC of a service the protobuf runtime knows. Only those keep
    their wrapped handler: a handler that answers any name (the v2 service's catch-all, UNIMPLEMENTED)
    would otherwise keep one for every name a client makes up, 5,000 for 5,000 calls, without bound."""
    service, _, rpc = method.lstrip("/").rpartition("/")
    try:
        descriptor_pool.Default().FindServiceByName(service).FindMethodByName(rpc)
    except KeyError:
        return False
    return True


STREAM_OPENS = object()  # what _check is given for a stream that opens, before any request


class CallGuard(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, admitted: tuple[str, ...], max_concurrent: int, max_streams: int) -> None:
        self.metrics = metrics
        # full service names (all their methods) or method paths (/service/Method) whose calls are
        # bounded and drained
        self.admitted = admitted
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.max_streams = max_streams
        self.streams_open = 0  # health's and reflection's, which are not admitted
        self.refusing: str | None = None  # a reason, once the server drains
        self.last_arrival = time.monotonic()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method  # type: ignore[attr-defined]
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
                return handler
            wrapped = self._wrap(method, handler)
            if declared(method):
                self._handlers[method] = wrapped
        return wrapped

    async def drained(self, quiet: float, timeout: float) -> bool:
        """Wait until no admitted call is in flight and none has arrived for ``quiet`` seconds;
        False if ``timeout`` passes first."""
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.in_flight == 0 and now - self.last_arrival >= quiet:
                return True
            if now >= end:
                return False
            if self.in_flight:
                try:
                    await asyncio.wait_for(self._idle.wait(), max(0.0, end - now))
                except TimeoutError:
                    return False
            else:
                await asyncio.sleep(min(quiet - (now - self.last_arrival), end - now))

    # --- wrapping ------------------------------------------------------------------------------

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, rpc = method.lstrip("/").rpartition("/")
        admit = service in self.admitted or f"/{service}/{rpc}" in self.admitted
        watch = not admit and handler.response_streaming  # a probe's stream: bounded apart (above)
        parse = handler.request_deserializer
        if parse is not None:
            descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
            parse = tolerant(parse, descriptor.full_name if descriptor is not None else rpc)
        if handler.request_streaming and handler.response_streaming:  # reflection, ModelStreamInfer
            inner_bidi = handler.stream_stream

            async def bidi(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async def checked() -> AsyncIterator[Any]:
                    async for request in requests:
                        if isinstance(request, Malformed):
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
                        if isinstance(request, Message) and (problem := enum_problem(request)):
                            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
                        yield request

                # a stream counts as one call, admitted when it opens (its requests meet the queues' own bounds)
                await self._check(rpc, STREAM_OPENS, context, admit, watch)
                try:
                    async for message in inner_bidi(checked(), context):
                        yield message
                finally:
                    self._leave(admit, watch)

            return grpc.stream_stream_rpc_method_handler(
                bidi, request_deserializer=parse, response_serializer=handler.response_serializer
            )
        if handler.request_streaming:  # client streaming: no such method here; left as grpc made it
            return handler
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._check(rpc, request, context, admit, watch)
                try:
                    async for message in inner_stream(request, context):
                        yield message
                finally:
                    self._leave(admit, watch)

            async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                await self._check(rpc, request, context, admit, watch)
                try:
                    await inner_stream(request, context)  # it writes with context.write (health's Watch)
                finally:
                    self._leave(admit, watch)

            return grpc.unary_stream_rpc_method_handler(
                stream if inspect.isasyncgenfunction(inner_stream) else writer,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(rpc, request, context, admit)
            try:
                return await inner(request, context)
            finally:
                self._leave(admit)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=parse, response_serializer=handler.response_serializer
        )

    async def _check(
        self, rpc: str, request: Any, context: grpc.aio.ServicerContext, admit: bool, watch: bool = False
    ) -> None:
        """Refuse the call (abort raises) or count it in."""
        code, message = None, ""
        if isinstance(request, Malformed):
            code, message = grpc.StatusCode.INVALID_ARGUMENT, request.why
        elif isinstance(request, Message) and (problem := enum_problem(request)):
            code, message = grpc.StatusCode.INVALID_ARGUMENT, problem
        elif admit:
            self.last_arrival = time.monotonic()
            if self.refusing is not None:
                code, message = grpc.StatusCode.UNAVAILABLE, self.refusing
            elif self.in_flight >= self.max_concurrent:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                message = f"{self.in_flight} calls in progress, the limit; retry later"
        elif watch and self.streams_open >= self.max_streams:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            message = (
                f"{self.streams_open} health and reflection streams open, the limit; "
                "close one, or ask health's Check, which is always answered"
            )
        if code is None:
            if admit:
                self.in_flight += 1
                self.metrics.in_flight.set(self.in_flight)
                self._idle.clear()
            elif watch:
                self.streams_open += 1
            return
        if admit or watch or code == grpc.StatusCode.INVALID_ARGUMENT:
            self.metrics.requests.labels(rpc, code.name).inc()
        await context.abort(code, message)

    def _leave(self, admit: bool, watch: bool = False) -> None:
        if watch:
            self.streams_open -= 1
        if admit:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            if self.in_flight == 0:
                self._idle.set()
