"""What every call goes through before a servicer sees it: parsing, enum checks, admission.

A gRPC server interceptor, so that one place covers every method of every service:

* Request bytes that do not parse (truncated, garbage, invalid UTF-8 in a string field) are
  answered INVALID_ARGUMENT with a plain message. Left to grpc, a failing deserializer
  becomes UNKNOWN with the exception's class in the message.
* A call to a method that takes one request, ended before one whole message arrived (the client
  half-closed with none sent, or mid-message), is answered INVALID_ARGUMENT. grpc.aio reads such a
  request itself and, finding none, returns without a status: the call was never answered, and held
  ~14 KB in the server until its connection closed, outside every bound here. So the guard hands
  grpc those methods as taking a stream of requests, and reads the one request itself. (gRPC's
  status table names UNIMPLEMENTED for a wrong number of requests; the method is there, and what is
  wrong is the request, as with bytes that do not parse.)
* Enum fields are proto3 open enums: any number parses. A value the schema does not name is
  refused here, for every request message alike, naming the field.
* Admission, for the services given as ``admitted`` (the model's, not health or reflection):
  at most ``max_concurrent`` calls at once, beyond that RESOURCE_EXHAUSTED at once; while
  the server drains for shutdown, UNAVAILABLE (which clients retry elsewhere). The guard
  counts the calls in flight, so shutdown can wait for them. A call counts from the moment it
  opens, before its request is read, so calls opened with nothing sent on them are bounded too.
* With ``api_keys``, the admitted services' calls must carry ``authorization: Bearer <key>`` with
  one of them, or are answered UNAUTHENTICATED before they count against any bound. The probes
  below never need one. Each key names a client; with ``max_per_client``, a client with that many
  calls in progress is refused RESOURCE_EXHAUSTED, so that one client cannot take every place; with
  ``rate``, a client's calls are taken from a bucket of ``burst`` filled at ``rate`` a second, and
  past it refused RESOURCE_EXHAUSTED with ``grpc-retry-pushback-ms``: the milliseconds until its
  next would be taken, which gRPC clients with a retry policy wait for in place of their own backoff;
  with ``token_rate``, a client's calls are taken while its bucket of ``token_burst`` tokens, filled at
  ``token_rate`` a second, holds any; the tokens the model reads and generates for it are taken as they
  are counted (``Metrics.tokens_by_client``), so that its calls may take it below empty and its next
  are refused, with ``grpc-retry-pushback-ms``, until it has filled back. Those are the server's; a
  client whose lines in the keys file set limits of its own (``client_limits``) has those in their place.
* A call of one request whose request has not come whole within ``read_timeout`` of its opening
  (and a reflection stream whose first has not) is answered DEADLINE_EXCEEDED; at a full bound the
  call that has waited longest for its request, once it has waited STALLED_SECONDS, is refused in
  place of the one that opens; and while the server drains, the model's calls that have waited that
  long are refused with UNAVAILABLE. Before, a call left open with nothing sent held its place until
  its client closed the connection (and the drain waited for it to the end of its grace), and a
  client that opened calls and sent nothing kept out every other. Likewise at a full bound of the
  model's calls, a stream whose handler says it has no request in progress (STREAM_IDLE; the v2
  service's, from its opening, since its client may open it long before its first request), idle
  longest and for STALLED_SECONDS, is ended to make room. The same at a client's own full bound
  (``max_per_client``), among that client's calls and streams alone; and at a full bound of the
  probes' streams, among reflection's, idle once answered as each waits for its next request.

Health and reflection (and the v2 service's liveness, readiness and metadata calls) are never
refused for load or shutdown: a probe must be answered whatever the server is doing. Only their
streams (health's Watch, reflection's), which stay open and hold memory for as long as the
client keeps them, are bounded: at most ``max_streams`` at once, beyond that RESOURCE_EXHAUSTED.
A health Check sent whole is always answered; of the probes' calls whose requests have not come,
at most ``max_streams`` wait, the one waiting longest refused to make room (however short its
wait). And their requests, which a stream holds for as long as it is open, are at most
PROBE_REQUEST_BYTES each (INVALID_ARGUMENT beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service import tracing
from service.config import HASHED_KEY
from service.errors import (
    API_KEY_INVALID,
    API_KEY_MISSING,
    CALLS_AT_LIMIT,
    CLIENT_CALL_RATE,
    CLIENT_CALLS_IN_PROGRESS,
    CLIENT_TOKEN_RATE,
    IDLE_STREAM,
    INVALID_INPUT,
    MALFORMED_REQUEST,
    NO_REQUEST,
    REQUEST_NOT_SENT,
    REQUEST_READ_TIMEOUT,
    REQUEST_TOO_LARGE,
    SHUTTING_DOWN,
    STREAMS_AT_LIMIT,
    details,
)
from service.logs import CLIENT
from service.metrics import Metrics

log = logging.getLogger(__name__)


class Malformed:
    """What the tolerant deserializer returns for bytes that are not a valid message."""

    __slots__ = ("reason", "why")

    def __init__(self, why: str, reason: str = MALFORMED_REQUEST) -> None:
        self.why = why
        self.reason = reason


def tolerant(parse: Callable[[bytes], Any], name: str, max_bytes: int = 0) -> Callable[[bytes], Any]:
    """``parse``, with bytes that do not parse (or, given ``max_bytes``, more bytes than that) made Malformed."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, and whatever else a parser may raise on hostile bytes
            return Malformed(f"request is not a valid {name} message ({len(data)} bytes)")

    if not max_bytes:
        return deserialize

    def bounded(data: bytes) -> Any:
        if len(data) > max_bytes:
            return Malformed(f"a {name} is at most {max_bytes} bytes here; this one is {len(data)}", REQUEST_TOO_LARGE)
        return deserialize(data)

    return bounded


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


EOF = grpc.aio.EOF
NO_REQUEST_SENT = Malformed("no request message: the call ended before one whole message arrived", NO_REQUEST)

# Probes' requests (health's, reflection's, the v2 service's liveness, readiness and metadata calls')
# name a service, a model, a file or a symbol: a few dozen bytes. Held by every stream open, they are
# bounded apart from the model's (max_request_bytes, 1 MiB): 200 health Watches naming 1 MB services
# each held 0.6 GB of the server's memory.
PROBE_REQUEST_BYTES = 4096

# A client sends a call's request with its headers, and a request read takes microseconds: at a full
# bound, a call that has waited this long for its request gives its place to one that comes.
STALLED_SECONDS = 1.0

UNNAMED = "unnamed"  # the client of a key given with no name, as metrics and the access log name it

# what a call counts against from the moment it opens (CallGuard._open)
ADMITTED = "admitted"  # the model's calls: max_concurrent
STREAM = "stream"  # health's Watch and reflection's streams: max_streams
# a probe's call of one request and one answer (health's Check; the v2 service's liveness, readiness
# and metadata), answered once its request is read: those waiting for their requests, max_streams
PROBE = "probe"


# Set for a stream of requests to the model's services (the v2 service's ModelStreamInfer) while its
# handler runs: the handler calls it with True when the stream has no request in progress and waits for
# the next, and with False as one comes. At a full bound of calls, the stream idle longest, once idle
# STALLED_SECONDS, is ended to make room (CallGuard._evict_idle): a client keeps such a stream open for
# good (tritonclient does), and it held a place all the same. Elsewhere, a no-op.
STREAM_IDLE: ContextVar[Callable[[bool], None]] = ContextVar("stream_idle", default=lambda idle: None)

# the limits of a client's own (CallGuard), as attnserve_client_calls_limited_total's label names them
IN_PROGRESS = "in_progress"  # max_per_client
RATE = "rate"  # rate and burst
TOKENS = "tokens"  # token_rate and token_burst
LIMIT_REASONS = {IN_PROGRESS: CLIENT_CALLS_IN_PROGRESS, RATE: CLIENT_CALL_RATE, TOKENS: CLIENT_TOKEN_RATE}


class ClientLimits(NamedTuple):
    """A client's own limits (0: none of that kind): calls in progress; calls a second and their
    bucket; tokens a second and theirs; the priority of its calls' work and the highest they get
    (as attnserve.v1's Priority numbers them: 1 high, 2 normal, 3 low)."""

    max_calls: int
    rate: float
    burst: int
    token_rate: float
    token_burst: int
    priority: int = 0

    def given(self, own: Mapping[str, float]) -> ClientLimits:
        """These limits with those ``own`` sets in their place (by the keys file's names,
        config.CLIENT_LIMITS); a rate given without its bucket has one second's of its own."""
        rate = own.get("calls_per_second", self.rate)
        token_rate = own.get("tokens_per_second", self.token_rate)
        return ClientLimits(
            int(own.get("max_calls", self.max_calls)),
            rate,
            int(own.get("burst", 0)) or (max(1, math.ceil(rate)) if "calls_per_second" in own else self.burst),
            token_rate,
            int(own.get("token_burst", 0))
            or (max(1, math.ceil(token_rate)) if "tokens_per_second" in own else self.token_burst),
            int(own.get("priority", self.priority)),
        )

    def of(self, kind: str) -> float:
        """The limit of ``kind`` (IN_PROGRESS, RATE or TOKENS)."""
        return {IN_PROGRESS: self.max_calls, RATE: self.rate, TOKENS: self.token_rate}[kind]

    def kinds(self) -> tuple[str, ...]:
        """The limits set, as attnserve_client_calls_limited_total's label names them."""
        return tuple(
            kind for kind, on in ((IN_PROGRESS, self.max_calls), (RATE, self.rate), (TOKENS, self.token_rate)) if on
        )


class ClientCalls:
    """The counts by client, for the scrape: ``attnserve_client_calls_total`` (client, rpc),
    ``attnserve_client_calls_in_progress`` (client) and ``attnserve_client_calls_limited_total``
    (client, limit), the guard's; ``attnserve_client_tokens_total`` (client, kind), the servicer's and
    the scheduler's (``Metrics.tokens_by_client``); and ``attnserve_client_limit`` (client, limit), what
    each client has. Their labels are the names in the keys file."""

    def __init__(self, guard: CallGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        calls = CounterMetricFamily(
            "attnserve_client_calls",
            "Calls to the model's services, by the client named with the API key they carried (unnamed for a "
            "key with no name), counted as the key is checked",
            labels=["client", "rpc"],
        )
        for (client, rpc), n in list(self.guard.calls_by_client.items()):  # (one step of the interpreter's)
            calls.add_metric([client, rpc], n)
        in_progress = GaugeMetricFamily(
            "attnserve_client_calls_in_progress",
            "Calls of the model's services in progress, by the client named with their API key",
            labels=["client"],
        )
        for client, n in list(self.guard.by_client.items()):
            in_progress.add_metric([client], n)
        limited = CounterMetricFamily(
            "attnserve_client_calls_limited_total",
            "Calls refused RESOURCE_EXHAUSTED for a limit of their client's own: its calls in progress "
            "(in_progress), its calls a second (rate) or its tokens a second (tokens); at 0 from a client's "
            "first call, for each limit set",
            labels=["client", "limit"],
        )
        tokens = CounterMetricFamily(
            "attnserve_client_tokens_total",
            "Tokens the model read and generated for each client: input (Encode's and AttentionMap's texts), "
            "prompt (generation's prompts, once prefilled) and generated (as the calls' usage says, a stream "
            "its client left counted to where it stopped); at 0 from a client's first call",
            labels=["client", "kind"],
        )
        limits = GaugeMetricFamily(
            "attnserve_client_limit",
            "The limits each client has (the server's, or those its line in the keys file sets), by kind: "
            "in_progress (calls), rate (calls a second), tokens (tokens a second); a kind it has none of is left out",
            labels=["client", "limit"],
        )
        counts = self.guard.limited_by_client
        used = self.guard.metrics.tokens_by_client
        for client in sorted({client for client, _ in list(self.guard.calls_by_client)}):
            own = self.guard.limits_of(client)
            for limit in own.kinds():
                limited.add_metric([client, limit], counts.get((client, limit), 0))
                limits.add_metric([client, limit], own.of(limit))
            for kind in ("input", "prompt", "generated"):
                tokens.add_metric([client, kind], used.get((client, kind), 0))
        for family in (calls, in_progress, limited, tokens, limits):
            if family.samples:  # none without API keys: no family either
                yield family


class CallGuard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        metrics: Metrics,
        admitted: tuple[str, ...],
        max_concurrent: int,
        max_streams: int,
        read_timeout: float,
        api_keys: Mapping[str, str] | None = None,
        max_per_client: int = 0,
        rate: float = 0.0,
        burst: int = 0,
        token_rate: float = 0.0,
        token_burst: int = 0,
        client_limits: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.access_log = False  # a record a call refused here (service.logs.access), when told so
        # each client's limits: the server's (below), or those its lines in the keys file set
        # (``client_limits``, by CLIENT_LIMITS' names), read as each of its calls opens
        self.limits = ClientLimits(
            max_per_client,
            rate,
            burst or max(1, math.ceil(rate)),
            token_rate,
            token_burst or max(1, math.ceil(token_rate)),
        )
        self._limits: dict[str, ClientLimits] = {}
        self.api_keys: tuple[tuple[bytes, str], ...] | None = None
        self.accept_keys(api_keys, client_limits)
        # full service names (all their methods) or method paths (/service/Method) whose calls are
        # bounded and drained
        self.admitted = admitted
        self.max_concurrent = max_concurrent
        # with api_keys: the admitted calls in progress of each client (its key's name)
        self.by_client: dict[str, int] = {}
        self.calls_by_client: dict[tuple[str, str], int] = {}  # (client, rpc): calls whose key was checked
        # each client's bucket of calls: calls it may open now, as of when (taken from, or filled, as
        # each of its calls opens)
        self._buckets: dict[str, tuple[float, float]] = {}
        # each client's bucket of tokens: the tokens it holds (below 0 where its calls used more than it
        # held), as of when, and the client's tokens counted then
        self._token_buckets: dict[str, tuple[float, float, int]] = {}
        self.limited_by_client: dict[tuple[str, str], int] = {}  # (client, limit): calls refused for it
        # both read by the scrape, not written to metrics each call: a labelled series' update, three a
        # call, cost more of the event loop than the key's check
        metrics.registry.register(ClientCalls(self))
        self.in_flight = 0
        self.max_streams = max_streams
        self.streams_open = 0  # health's and reflection's, which are not admitted
        # calls of one request opened and waiting for it, by kind, oldest first: their rpc, since when,
        # and their client (None without API keys, and for probes)
        self._unread: dict[str, dict[grpc.aio.ServicerContext, tuple[str, float, str | None]]] = {
            ADMITTED: {},
            STREAM: {},
            PROBE: {},
        }
        # streams with no request in progress, by kind, idle longest first: their rpc, since when idle,
        # since when open, and their client. The model's (ADMITTED) as their handlers tell (STREAM_IDLE);
        # reflection's (STREAM) once answered, as each waits for its next request
        self._idle_streams: dict[str, dict[grpc.aio.ServicerContext, tuple[str, float, float, str | None]]] = {
            ADMITTED: {},
            STREAM: {},
        }
        self.read_timeout = read_timeout  # a request not come whole in this long: DEADLINE_EXCEEDED
        self.stalled_seconds = STALLED_SECONDS
        self._sweep: asyncio.TimerHandle | None = None  # the next look for requests overdue
        self._giving_up: set[asyncio.Task[None]] = set()
        self.refusing: str | None = None  # a reason, once the server drains
        self.last_moved = time.monotonic()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def accept_keys(
        self, keys: Mapping[str, str] | None, client_limits: Mapping[str, Mapping[str, float]] | None = None
    ) -> None:
        """Take ``keys`` (each to the name of its client, or "") as the ones an admitted call may carry
        (None: no key needed), and ``client_limits`` as the limits of the clients that have their own
        (by CLIENT_LIMITS' names; the others have the server's), in place of those before, from the
        next call on."""
        # as bytes, compared in constant time; those given as their SHA-256 (HASHED_KEY), as its digest,
        # compared with the digest of the key a call carries
        if keys is None:
            self.api_keys = self.hashed_keys = None
        else:
            self.api_keys = tuple(
                (k.encode(), keys[k] or UNNAMED) for k in sorted(keys) if not k.startswith(HASHED_KEY)
            )
            self.hashed_keys = tuple(
                (bytes.fromhex(k.removeprefix(HASHED_KEY)), keys[k] or UNNAMED)
                for k in sorted(keys)
                if k.startswith(HASHED_KEY)
            )
        self._limits = {name: self.limits.given(own) for name, own in (client_limits or {}).items()}

    def limits_of(self, client: str) -> ClientLimits:
        """``client``'s limits: its own, or the server's."""
        return self._limits.get(client, self.limits)

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
        """Wait until no admitted call is in flight and none has opened or ended for ``quiet``
        seconds; False if ``timeout`` passes first. (Waited from the last call's end too, so that its
        answer has gone out before the transport is stopped: gRPC writes its GOAWAY ahead of the
        streams' frames, and an answer given just before could follow it, which peers that take no
        frame after a GOAWAY, as h2 does, lose.)"""
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.in_flight == 0 and now - self.last_moved >= quiet:
                return True
            if now >= end:
                return False
            if self.in_flight:
                try:
                    await asyncio.wait_for(self._idle.wait(), max(0.0, end - now))
                except TimeoutError:
                    return False
            else:
                await asyncio.sleep(min(quiet - (now - self.last_moved), end - now))

    # --- wrapping ------------------------------------------------------------------------------

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, rpc = method.lstrip("/").rpartition("/")
        if service in self.admitted or f"/{service}/{rpc}" in self.admitted:
            kind = ADMITTED
        else:  # a probe's stream, or a probe's call of one request: bounded apart (above)
            kind = STREAM if handler.response_streaming else PROBE
        parse = handler.request_deserializer
        if parse is not None:
            descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
            bound = 0 if kind is ADMITTED else PROBE_REQUEST_BYTES
            parse = tolerant(parse, descriptor.full_name if descriptor is not None else rpc, bound)
        if handler.request_streaming and handler.response_streaming:  # reflection, ModelStreamInfer
            inner_bidi = handler.stream_stream

            async def bidi(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with self._stream_call(rpc, context, kind, requests) as checked:
                    async for message in inner_bidi(checked, context):
                        yield message

            async def bidi_writer(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                async with self._stream_call(rpc, context, kind, requests) as checked:
                    await inner_bidi(checked, context)  # it writes with context.write (ModelStreamInfer)

            return grpc.stream_stream_rpc_method_handler(
                bidi if inspect.isasyncgenfunction(inner_bidi) else bidi_writer,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming:  # client streaming: no such method here; left as grpc made it
            return handler
        # The methods that take one request are handed to grpc as taking a stream of them, and read
        # their one request here (see the module's docstring).
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(_: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                request = await self._request(rpc, context, kind)
                try:
                    async for message in inner_stream(request, context):
                        yield message
                finally:
                    self._leave(kind)

            async def writer(_: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
                request = await self._request(rpc, context, kind)
                try:
                    await inner_stream(request, context)  # it writes with context.write (health's Watch)
                finally:
                    self._leave(kind)

            return grpc.stream_stream_rpc_method_handler(
                stream if inspect.isasyncgenfunction(inner_stream) else writer,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        inner = handler.unary_unary

        async def unary(_: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            request = await self._request(rpc, context, kind)
            try:
                return await inner(request, context)
            finally:
                self._leave(kind)

        return grpc.stream_unary_rpc_method_handler(
            unary, request_deserializer=parse, response_serializer=handler.response_serializer
        )

    @contextlib.asynccontextmanager
    async def _stream_call(
        self, rpc: str, context: grpc.aio.ServicerContext, kind: str, requests: AsyncIterator[Any]
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """A bidirectional stream counted in (or refused) for the length of the block, which is given
        its requests, each checked. A stream counts as one call (its requests meet the queues' own
        bounds). A probe's (reflection's) waits for its first request as a call of one request waits
        for its one; the model's (ModelStreamInfer) is told idle by its handler from its opening
        instead, since a client may open it long before its first request (tritonclient's
        start_stream): so it gives its place at a full bound, but is not timed out. Either, once it
        has no request in progress, gives its place at a full bound of its kind."""
        await self._open(rpc, context, kind)
        opened = time.monotonic()
        idle = self._idle_streams[kind]
        client = CLIENT.get()

        def tell(now_idle: bool) -> None:
            if not now_idle:
                idle.pop(context, None)
            elif context not in idle:
                idle[context] = (rpc, time.monotonic(), opened, client)

        if kind is ADMITTED:
            STREAM_IDLE.set(tell)  # (in this call's task: its handler's, and the tasks it makes)
        try:
            pending = aiter(requests)
            first = None if kind is ADMITTED else await self._awaited(rpc, context, kind, anext(pending, EOF))

            async def checked() -> AsyncIterator[Any]:
                if first is EOF:  # half-closed with nothing sent: a stream of no requests
                    return
                if first is not None:
                    await self._check(rpc, first, context)
                    yield first
                while True:
                    # reflection answers each request before it asks for the next: waiting
                    # here, it has none in progress (the model's handler tells for itself)
                    if kind is STREAM:
                        tell(True)
                    request = await anext(pending, EOF)
                    if kind is STREAM:
                        tell(False)
                    if request is EOF:
                        return
                    await self._check(rpc, request, context)
                    yield request

            yield checked()
        finally:
            idle.pop(context, None)
            self._leave(kind)

    async def _request(self, rpc: str, context: grpc.aio.ServicerContext, kind: str) -> Any:
        """Count the call in (or refuse it), then read its one request and check it; a refusal
        raises (abort). Once it returns, the caller leaves. A second message, were a client to send
        one, is left unread, as grpc's own path for such methods leaves it.

        While its request has not come whole the call waits among the unread: one that waits
        ``read_timeout`` is answered DEADLINE_EXCEEDED (``_overdue``), and at a full bound the one
        that has waited longest, past ``stalled_seconds``, makes room for a newcomer (``_open``).
        Of the probes' calls, at most ``max_streams`` wait: a probe is answered as soon as its
        request is read, so only those whose requests do not come add up, and past that the one
        waiting longest is refused, never the one that opens."""
        await self._open(rpc, context, kind)
        try:
            request = await self._awaited(rpc, context, kind, context.read())
            await self._check(rpc, NO_REQUEST_SENT if request is EOF else request, context)
        except BaseException:
            self._leave(kind)
            raise
        return request

    async def _awaited(self, rpc: str, context: grpc.aio.ServicerContext, kind: str, read: Awaitable[Any]) -> Any:
        """What ``read`` gives (a call's first request, or EOF), awaited among the calls of ``kind``
        waiting for their requests: those that wait ``read_timeout`` are answered (``_overdue``), and
        at a full bound the one waiting longest makes room (``_evict``)."""
        unread = self._unread[kind]
        if kind is PROBE and len(unread) >= self.max_streams:
            self._evict(PROBE, f"{len(unread)} probe calls waiting for their requests, the limit")
        unread[context] = (rpc, time.monotonic(), CLIENT.get() if kind is ADMITTED else None)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.read_timeout, self._overdue)
        try:
            return await read
        finally:
            unread.pop(context, None)

    async def _check(self, rpc: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        """Refuse a request that is not a valid message, or that holds an enum value its schema does not name."""
        if isinstance(request, Malformed):
            await self._refuse(rpc, context, grpc.StatusCode.INVALID_ARGUMENT, request.why, request.reason)
        elif isinstance(request, Message) and (problem := enum_problem(request)):
            await self._refuse(rpc, context, grpc.StatusCode.INVALID_ARGUMENT, problem, INVALID_INPUT)

    async def _open(self, rpc: str, context: grpc.aio.ServicerContext, kind: str) -> None:
        """Count a call in as it opens, before its request is read, or refuse it. A call waiting for
        its request holds its place meanwhile, so calls that clients open and send nothing on are
        bounded as all others are; at a full bound, the one that has waited longest for its request,
        if it has waited ``stalled_seconds``, is refused in place of the one that opens."""
        if kind is ADMITTED:
            if self.api_keys is not None:
                client, problem, reason = self._authenticate(context)
                if problem:
                    await self._refuse(rpc, context, grpc.StatusCode.UNAUTHENTICATED, problem, reason)
                CLIENT.set(client)  # for the call's records (service.logs.caller), and for _leave
                counted = self.calls_by_client
                counted[client, rpc] = counted.get((client, rpc), 0) + 1
                # its own limits, those that take nothing first, so that a call refused takes nothing
                limits = self.limits_of(client)
                held = self.by_client.get(client, 0)
                if limits.max_calls and held >= limits.max_calls:
                    # its own call stalled for its request, or its own stream idle, gives way first: a
                    # client that keeps streams open for good (tritonclient) is not kept out by them
                    full = f"client {client} has {held} calls in progress, its limit"
                    if not self._evict_stalled(ADMITTED, full, client) and not self._evict_idle(ADMITTED, full, client):
                        await self._limit(rpc, context, client, IN_PROGRESS, f"{full}; retry later")
                if limits.token_rate and (wait := self._owed(client, limits)):
                    await self._over_rate(rpc, context, client, TOKENS, wait, limits)
                if limits.rate and (wait := self._take(client, limits)):
                    await self._over_rate(rpc, context, client, RATE, wait, limits)
            self.last_moved = time.monotonic()
            if self.refusing is not None:
                await self._refuse(rpc, context, grpc.StatusCode.UNAVAILABLE, self.refusing, SHUTTING_DOWN)
            if self.in_flight >= self.max_concurrent:
                full = f"{self.in_flight} calls in progress, the limit"
                if not self._evict_stalled(ADMITTED, full) and not self._evict_idle(ADMITTED, full):
                    message = f"{full}; retry later"
                    await self._refuse(rpc, context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, CALLS_AT_LIMIT)
            if self.api_keys is not None:
                self.by_client[client] = self.by_client.get(client, 0) + 1
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            self._idle.clear()
        elif kind is STREAM:
            if self.streams_open >= self.max_streams:
                full = f"{self.streams_open} health and reflection streams open, the limit"
                if not self._evict_stalled(STREAM, full) and not self._evict_idle(STREAM, full):
                    message = f"{full}; close one, or ask health's Check, which is always answered"
                    await self._refuse(rpc, context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, STREAMS_AT_LIMIT)
            self.streams_open += 1

    def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[str, str, str]:
        """The name of the client whose key the call carries, or why its key is not one of
        ``api_keys`` (and the reason). Every key is compared, each in constant time, so the time
        taken says nothing of how near a guess came."""
        assert self.api_keys is not None
        given = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        if not isinstance(given, str):
            return "", "this server needs an API key: send it as 'authorization: Bearer <key>'", API_KEY_MISSING
        scheme, _, key = given.strip().partition(" ")
        if scheme.lower() != "bearer":
            message = "the authorization header's scheme is not Bearer: send 'authorization: Bearer <key>'"
            return "", message, API_KEY_MISSING
        token = key.strip().encode()
        client = ""
        for known, name in self.api_keys:
            if hmac.compare_digest(token, known):
                client = name
        if self.hashed_keys:  # (its digest, once, where the file holds any key given as one)
            digest = hashlib.sha256(token).digest()
            for known, name in self.hashed_keys:
                if hmac.compare_digest(digest, known):
                    client = name
        return (client, "", "") if client else ("", "the API key is not one this server accepts", API_KEY_INVALID)

    def _take(self, client: str, limits: ClientLimits) -> float:
        """Take a call from ``client``'s bucket, filled at its ``rate`` a second up to its ``burst``
        (full as it first calls): 0.0, or, where not one whole call is there, the seconds until one
        will be (a call refused takes nothing, so a client that keeps calling still gets ``rate``
        through)."""
        now = time.monotonic()
        left, then = self._buckets.get(client, (limits.burst, now))
        left = min(limits.burst, left + (now - then) * limits.rate)
        if left >= 1:
            self._buckets[client] = (left - 1, now)
            return 0.0
        self._buckets[client] = (left, now)
        return (1 - left) / limits.rate

    def _owed(self, client: str, limits: ClientLimits) -> float:
        """0.0 where ``client``'s token bucket (its ``token_burst``, filled at its ``token_rate`` a
        second, full as it first calls) holds any token, else the seconds until it will. The tokens its calls used
        since the last look (Metrics.tokens_by_client, counted as the model reads and generates them)
        are taken first, so the bucket may be below empty: its calls in progress may use more than it
        held, and they are paid back before its next is taken."""
        used = self.metrics.tokens_by_client
        spent = used.get((client, "input"), 0) + used.get((client, "prompt"), 0) + used.get((client, "generated"), 0)
        now = time.monotonic()
        left, then, counted = self._token_buckets.get(client, (limits.token_burst, now, spent))
        left = min(limits.token_burst, left + (now - then) * limits.token_rate) - (spent - counted)
        self._token_buckets[client] = (left, now, spent)
        return 0.0 if left > 0 else max(-left / limits.token_rate, 0.001)

    async def _over_rate(
        self, rpc: str, context: grpc.aio.ServicerContext, client: str, limit: str, wait: float, limits: ClientLimits
    ) -> None:
        """Refuse a call of ``client``'s, over its rate of calls (RATE) or tokens (TOKENS) a second, and
        tell it in how long (``wait`` seconds) it may come back, in the message and as
        ``grpc-retry-pushback-ms``."""
        rate, burst, unit = (
            (limits.rate, limits.burst, "calls") if limit is RATE else (limits.token_rate, limits.token_burst, "tokens")
        )
        ms = math.ceil(wait * 1000)
        message = f"client {client} is over its rate of {rate:g} {unit} a second (a burst of {burst}); retry in {ms} ms"
        await self._limit(rpc, context, client, limit, message, ms)

    async def _limit(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        client: str,
        limit: str,
        message: str,
        pushback_ms: int | None = None,
    ) -> None:
        """Refuse a call RESOURCE_EXHAUSTED for ``limit``, one of its client's own, counted under both;
        with ``pushback_ms``, the milliseconds it may come back in."""
        counts = self.limited_by_client
        counts[client, limit] = counts.get((client, limit), 0) + 1
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        await self._refuse(rpc, context, code, message, LIMIT_REASONS[limit], pushback_ms=pushback_ms)

    def _evict_stalled(self, kind: str, full: str, client: str | None = None) -> bool:
        """At a full bound (``full`` says which): refuse the call of ``kind`` (of ``client``'s, given
        one) waiting longest for its request if it has waited ``stalled_seconds``, and say whether
        one was. Its place comes back as its read ends, so meanwhile the bound is passed by the calls
        being refused."""
        unread = self._unread[kind]
        oldest = next((c for c, held in unread.items() if client is None or held[2] == client), None)
        if oldest is None or time.monotonic() - unread[oldest][1] < self.stalled_seconds:
            return False
        self._evict(kind, full, oldest)
        return True

    def _evict_idle(self, kind: str, full: str, client: str | None = None) -> bool:
        """At a full bound of ``kind`` (``full`` says which): end the stream of that kind (of
        ``client``'s, given one) with no request in progress for the longest, if that has been
        ``stalled_seconds``, and say whether one was. It is answered RESOURCE_EXHAUSTED, as a call
        refused at a full server is: a client that keeps a stream open for good opens another when it
        next has a request."""
        idle = self._idle_streams[kind]
        context = next((c for c, held in idle.items() if client is None or held[3] == client), None)
        if context is None or (idle_for := time.monotonic() - idle[context][1]) < self.stalled_seconds:
            return False
        rpc, _, opened, _ = idle.pop(context)
        message = f"{full}; this stream had no request in progress for the longest ({idle_for:.1f} s)"
        self._give_up(rpc, context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, opened, "idle", IDLE_STREAM)
        return True

    def _evict(self, kind: str, why: str, context: grpc.aio.ServicerContext | None = None) -> None:
        """Refuse the call of ``kind`` waiting longest for its request (or ``context``, one of them),
        to make room for another."""
        unread = self._unread[kind]
        if context is None:
            context = next(iter(unread))
        rpc, since, _ = unread.pop(context)
        message = f"{why}; this call waited longest for its request"
        self._give_up(rpc, context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, since, "evicted", REQUEST_NOT_SENT)

    def _overdue(self) -> None:
        """Answer the calls whose requests have not come whole in time, and look again when the
        oldest left would be due. In time is within ``read_timeout``, or, for the model's calls
        while the server drains, within ``stalled_seconds``: such a call has started nothing, and
        the drain would wait for it (refused with UNAVAILABLE, which clients retry elsewhere)."""
        self._sweep = None
        now = time.monotonic()
        next_due = math.inf
        for kind, unread in self._unread.items():
            draining = self.refusing if kind is ADMITTED else None  # the reason, while the server drains
            wait = self.stalled_seconds if draining is not None else self.read_timeout
            while unread:
                context, (rpc, since, _) = next(iter(unread.items()))
                if since + wait > now:
                    next_due = min(next_due, since + wait)
                    break
                del unread[context]
                if draining is not None:
                    self._give_up(rpc, context, grpc.StatusCode.UNAVAILABLE, draining, since, "draining", SHUTTING_DOWN)
                else:
                    message = f"no whole request within {self.read_timeout:g} s of the call opening"
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    self._give_up(rpc, context, code, message, since, "read_timeout", REQUEST_READ_TIMEOUT)
        if next_due < math.inf:
            self._sweep = asyncio.get_running_loop().call_later(next_due - now, self._overdue)

    def _give_up(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        since: float,
        why: str,
        reason: str,
    ) -> None:
        """Answer a call still waiting for its request since ``since``, from a task of its own; the
        call's read then ends, and its task with it, giving its place back. Counted apart by ``why``
        too: a call whose client sent nothing is not the server's failure, whatever its code."""

        async def answer() -> None:
            self.metrics.without_request.labels(why).inc()
            with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError):
                await self._refuse(rpc, context, code, message, reason, since)

        task = asyncio.get_running_loop().create_task(answer())
        self._giving_up.add(task)
        task.add_done_callback(self._giving_up.discard)

    def refuse(self, reason: str) -> None:
        """Refuse admitted calls from now on with UNAVAILABLE and ``reason`` (the server drains).
        Those still waiting for their requests are refused too once they have waited
        ``stalled_seconds`` (``_overdue``)."""
        self.refusing = reason
        if self._sweep is not None:
            self._sweep.cancel()
        self._overdue()

    @property
    def probes_waiting(self) -> int:
        """Probe calls (PROBE) opened whose requests have not come."""
        return len(self._unread[PROBE])

    async def _refuse(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        since: float | None = None,
        pushback_ms: int | None = None,
    ) -> None:
        """Answer a call ``code`` with ``message`` for ``reason``, with the google.rpc.Status that says
        the same (errors.details), and, given ``pushback_ms``, ``grpc-retry-pushback-ms`` (and the
        Status's RetryInfo) saying when to come back; ``since``: when it opened, where it waited (for
        its request)."""
        self.metrics.requests.labels(rpc, code.name).inc()
        self.metrics.errors.labels(rpc, reason).inc()
        seconds = 0.0 if since is None else time.monotonic() - since
        tracing.answered(rpc, code.name, seconds, context, message, self.access_log, reason)
        trailing: tuple[tuple[str, str | bytes], ...]
        if pushback_ms is None:
            trailing = details(code, message, reason)
        else:
            said = details(code, message, reason, pushback_ms / 1000)
            trailing = (("grpc-retry-pushback-ms", str(pushback_ms)), *said)
        await context.abort(code, message, trailing)

    def _leave(self, kind: str) -> None:
        if kind is ADMITTED:
            if (client := CLIENT.get()) is not None:  # (set by _open, in this call's task, and counted there)
                self.by_client[client] -= 1  # (kept at 0: its series stays, as a gauge's would)
            self.last_moved = time.monotonic()
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            if self.in_flight == 0:
                self._idle.set()
        elif kind is STREAM:
            self.streams_open -= 1
