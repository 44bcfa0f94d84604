"""Transport: protobuf to domain objects and back, validation, and status codes. Nothing else.

Every RPC goes through ``_call``, which counts it, times it, and turns what the layers below
raise into a gRPC status: domain errors by their code, anything else as INTERNAL with a
generic message and an id (the details go to the log under that id, never to the client).

A call uses one model from start to end: the first time it asks for the model, the one loaded
then is pinned to it (``Loaded``) until its handler ends, so a model loaded again while it runs
(``Server.reload_model``) serves the calls that begin after, and the one before is stopped once
its own calls have ended.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import platform
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc
import numpy as np
import onnxruntime

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service import tracing
from service.config import NORMAL, PRIORITIES
from service.engine import AttentionMap as AttentionOutput
from service.engine import Cut, Embedded, Engine
from service.errors import (
    ATTENTION_BYTES_AT_LIMIT,
    CLIENT_ATTENTION_BYTES,
    STREAM_NOT_READ,
    Failure,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    details,
    status_for,
)
from service.guard import ClientLimits
from service.logs import CLIENT, caller
from service.metrics import Metrics
from service.runtime import ModelInfo
from service.sampling import MAX_STOP_SEQUENCES, SamplingParams
from service.scheduler import Done, Event, Finish, Scheduler, Token

log = logging.getLogger(__name__)

T = TypeVar("T")


class Loaded:
    """One model directory's engine and generation scheduler, and how many calls use them.

    Retired (another model has taken its place), it says ``idle`` once the last call that
    pinned it has ended; until then they are served by it as they began."""

    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.users = 0
        self.retired = False
        self.idle = asyncio.Event()

    @property
    def info(self) -> ModelInfo:
        return self.engine.runtime.info

    def __str__(self) -> str:
        return f"{self.info.name} {self.info.version}"

    def take(self) -> None:
        self.users += 1

    def give(self) -> None:
        self.users -= 1
        if self.retired and not self.users:
            self.idle.set()

    def retire(self) -> None:
        self.retired = True
        if not self.users:
            self.idle.set()


# the model a call pinned, in its task's context (tasks it starts share it, and take none of their own)
PINNED: ContextVar[Loaded | None] = ContextVar("attnserve_pinned_model", default=None)


class Writing:
    """A stream's place in the WriteWatch: ``since`` (monotonic) while gRPC has yet to take the message
    it was given, 0 between messages; ``stalled`` once the watch has ended it."""

    __slots__ = ("since", "stalled", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.since = 0.0
        self.stalled = False


class WriteWatch:
    """The streams in progress (GenerateStream's, ModelStreamInfer's), and an end to those whose
    client reads nothing.

    gRPC takes a stream's message once the client's window has room for it: a client that stops
    reading, with its connection alive (keepalive answered), leaves the stream's handler waiting in
    its write for as long as the call lasts, which without a deadline is for ever, holding a place of
    ``max_concurrent_calls`` and of its client's, and the model it began on. ``sweep`` (every
    ``every`` seconds) cancels each stream whose write has waited ``seconds``; the stream then ends
    with DEADLINE_EXCEEDED (STREAM_NOT_READ), which gRPC sends after the messages the client has not
    read, and gives all of that back. A client reading slowly is let be: what counts is how long
    gRPC has waited to take one message, not how long the stream has lasted."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.every = min(1.0, seconds / 4)
        self.streams: set[Writing] = set()

    def join(self) -> Writing | None:
        """The calling stream's place in the watch (None outside a task): its handler times each
        write with ``since`` and leaves the watch (``streams.discard``) as it ends."""
        task = asyncio.current_task()
        if task is None:
            return None
        writing = Writing(task)
        self.streams.add(writing)
        return writing

    def sweep(self) -> None:
        waited_since = time.monotonic() - self.seconds
        for stream in self.streams:
            if 0.0 < stream.since < waited_since and not stream.stalled:
                stream.stalled = True
                stream.task.cancel()

    def answer(self, writing: Writing | None, context: grpc.aio.ServicerContext) -> str | None:
        """For a stream cancelled in a write: where the watch ended it, its status set (gRPC sends it
        after what the client has not read) and the message said, for the stream to count; None where
        the client went away or its deadline passed."""
        if writing is None or not writing.stalled:
            return None
        said = f"the client read nothing of this stream for {self.seconds:g}s; ended"
        context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
        context.set_details(said)
        context.set_trailing_metadata(details(grpc.StatusCode.DEADLINE_EXCEEDED, said, STREAM_NOT_READ))
        return said


@dataclass(frozen=True)
class RequestLimits:
    """The input a request may bring, checked before any of it is tokenized."""

    max_texts_per_request: int = 64
    max_text_bytes: int = 256 * 1024  # one text (UTF-8); beyond the context only a prefix is tokenized anyway
    max_request_bytes: int = 1024 * 1024  # all texts of one request together
    # attention maps being computed or sent, all calls together (see AttentionBudget)
    max_attention_bytes: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        limits = (self.max_texts_per_request, self.max_text_bytes, self.max_request_bytes, self.max_attention_bytes)
        if min(limits) < 1:
            raise ValueError(f"request limits must be positive: {self}")


# The share of max_attention_bytes one client (named by its API key) may hold: a client whose answers
# wait unread cannot take the others' share.
CLIENT_SHARE = 0.5


class AttentionBudget:
    """The bytes of attention maps taken for calls in progress, up to a limit: taken before a map is
    computed, given back when its call has ended (its answer sent, or the call gone).
    Beyond the limit a call is refused at once; one call is always let through, whatever its size.
    A map is held several times over on its way out (the array, its bytes, the message, gRPC's copy):
    a burst of 256 calls for 3 MB maps whose clients read nothing took the server to 2.6 GB, past the
    2 GiB its Kubernetes manifest allows, and to 0.55 GB with the default limit. A client that reads
    nothing holds its maps here for as long as its call lasts: the answer waits in gRPC's transport
    for a window that does not open, and the call ends with its deadline or its connection (keepalive
    finds out a client that stops answering pings; max_connection_age_seconds, one that answers them).
    So that one such client cannot refuse everyone's maps meanwhile, a client named by its API key
    may hold at most CLIENT_SHARE of the limit (its first map always passes); without API keys
    there is no client to tell apart."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.by_client: dict[str, int] = {}  # (API keys' clients holding any)

    def take(self, n: int, client: str | None = None) -> Callable[[], None]:
        """Hold n bytes for ``client`` (Overloaded where they do not fit); returns what gives them back, once."""
        if self.held and self.held + n > self.limit:
            raise Overloaded(
                f"{self.held / 2**20:.0f} MiB of attention maps are being computed or sent, and "
                f"{n / 2**20:.1f} MiB more would pass the limit of {self.limit / 2**20:.0f} MiB; retry later",
                ATTENTION_BYTES_AT_LIMIT,
            )
        mine = self.by_client.get(client, 0) if client is not None else 0
        if mine and mine + n > self.limit * CLIENT_SHARE:
            raise Overloaded(
                f"this client holds {mine / 2**20:.1f} MiB of attention maps being computed or not yet read, and "
                f"{n / 2**20:.1f} MiB more would pass its share, half of the server's {self.limit / 2**20:.0f} MiB; "
                "read the answers of its calls in progress, or retry later",
                CLIENT_ATTENTION_BYTES,
            )
        self.held += n
        if client is not None:
            self.by_client[client] = mine + n
        given = False

        def give_back() -> None:
            nonlocal given
            if not given:
                given = True
                self.held -= n
                if client is not None:
                    left = self.by_client.pop(client) - n
                    if left:
                        self.by_client[client] = left

        return give_back


@dataclass(frozen=True)
class Encoded:
    output: Embedded
    truncated: list[bool]


@dataclass(frozen=True)
class Attended:
    output: AttentionOutput
    ids: list[int]
    layers: list[int]
    heads: list[int]
    truncated: bool
    release: Callable[[], None]  # gives its bytes back to the AttentionBudget: call once the answer is sent


# What a client may know of the model directory's config.json: the model, not where it was made.
PUBLIC_CONFIG_KEYS = ("format", "name", "version", "model", "eot_token_id")


def public_config(raw: dict[str, Any]) -> dict[str, Any]:
    out = {k: raw[k] for k in PUBLIC_CONFIG_KEYS if k in raw}
    if isinstance(raw.get("training"), dict):
        out["training"] = {k: v for k, v in raw["training"].items() if k in ("steps", "train_seq_len")}
    return out


def some(values: Sequence[int], shown: int = 5) -> str:
    """'[7, 9]', or '[7, 9, 12, 14, 20] and 95 more': the first few of values, for a message that
    names what was wrong without echoing a request's whole list back."""
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return f"{list(values[:shown])}{more}"


@functools.cache
def _values_prefix(dimensions: int) -> bytes:
    """What precedes an Embedding's values on the wire: their field's tag and byte length, as protobuf
    itself writes them for a vector of ``dimensions`` floats (packed, the only field set)."""
    return pb.Embedding(values=[0.0] * dimensions).SerializeToString()[: -4 * dimensions]


def add_embeddings(into: Any, vectors: np.ndarray, token_counts: Sequence[int], truncated: Sequence[bool]) -> None:
    """An Embedding in ``into`` (a repeated field) for each row of ``vectors`` (N, d): its values parsed
    from the row's float32 bytes, which protobuf copies at once, where a list of Python floats is
    converted one number at a time (8 embeddings of 128: 16 against 39 us on one core)."""
    prefix = _values_prefix(vectors.shape[1])
    add = into.add
    for row, count, cut in zip(vectors.astype("<f4", copy=False), token_counts, truncated, strict=True):
        add(token_count=count, truncated=cut).MergeFromString(prefix + row.tobytes())


class AttnServeServicer(pb_grpc.AttnServeServicer):
    def __init__(self, metrics: Metrics, limits: RequestLimits) -> None:
        self.metrics = metrics
        self.access_log = False  # a record a call answered (service.logs.access), when told so
        self.access_log_errors_only = False  # ... for a call not answered OK alone
        self.limits = limits
        self.loaded: Loaded | None = None  # set once the model is loaded and warmed up
        self.max_concurrent_calls = 0  # told by the server, for GetModelInfo
        self.limits_of: Callable[[str], ClientLimits] | None = None  # a client's own limits (the guard's), likewise
        self.attention_budget = AttentionBudget(limits.max_attention_bytes)
        self.write_watch: WriteWatch | None = None  # told by the server where streams not read are ended

    def attach(self, engine: Engine, scheduler: Scheduler) -> Loaded | None:
        """Serve the calls that begin from now with ``engine`` and ``scheduler``; the model they
        replace (retired), whose calls in progress go on with it, or None."""
        before, self.loaded = self.loaded, Loaded(engine, scheduler)
        if before is not None:
            before.retire()
        return before

    @property
    def engine(self) -> Engine | None:
        return None if self.loaded is None else self.loaded.engine

    @property
    def scheduler(self) -> Scheduler | None:
        return None if self.loaded is None else self.loaded.scheduler

    def _model(self) -> Loaded:
        """The model this call uses: the one it pinned, or else the one loaded now, pinned to the
        call (in its task's context) until the call's handler ends (``_unpin``)."""
        pinned = PINNED.get()
        if pinned is not None:
            return pinned
        loaded = self.loaded
        if loaded is None:
            raise ModelNotReady("model is loading")
        loaded.take()
        PINNED.set(loaded)
        return loaded

    @staticmethod
    def _unpin() -> None:
        """Give back the model the call pinned, as its handler ends: ``_call``'s, and the streams',
        which are every way in to the model. (A task's done callback would do it whatever the way in,
        but costs a turn of the event loop, 2 us a call.)"""
        pinned = PINNED.get()
        if pinned is not None:
            PINNED.set(None)
            pinned.give()

    def _engine(self) -> Engine:
        return self._model().engine

    async def _call(self, rpc: str, context: grpc.aio.ServicerContext, handler: Callable[[], Awaitable[T]]) -> T:
        start = time.monotonic()
        try:
            result = await handler()
        except Exception as e:
            failed = self.failure(rpc, e, context)
            # before answering, so that a client that reads the metrics next sees it
            self._observe(rpc, failed.code, start, context, failed.message, failed.reason)
            await context.abort(failed.code, failed.message, failed.trailers())
            raise  # abort raises; this line is for type checkers
        except asyncio.CancelledError:  # the client went away or its deadline passed
            self._observe(rpc, grpc.StatusCode.CANCELLED, start, context)
            raise
        finally:
            self._unpin()
        self._observe(rpc, grpc.StatusCode.OK, start, context)
        return result

    @staticmethod
    def failure(rpc: str, e: Exception, context: grpc.aio.ServicerContext) -> Failure:
        """What the client is told of an exception. One of the server's own is logged with its trace
        under an id of its own, with the caller's address and the request's id (``x-request-id``)
        where it sent one, and the client is told that id (in the message, and as ErrorInfo's
        ``errorId``) and nothing else of it: so the record of a failed call can be found among the
        server's, from the client's side."""
        failed = status_for(e)
        if failed.code == grpc.StatusCode.INTERNAL:
            error = secrets.token_hex(8)
            fields = {"rpc": rpc, "error_id": error, **caller(context)}
            said = "; ".join(f"{k} {v}" for k, v in fields.items() if k != "rpc")
            log.error("%s failed (%s)", rpc, said, exc_info=e, extra=fields)
            return failed._replace(message=f"{failed.message} as error {error}", metadata={"errorId": error})
        return failed

    def _observe(
        self,
        rpc: str,
        code: grpc.StatusCode,
        start: float,
        context: grpc.aio.ServicerContext,
        detail: str = "",
        reason: str = "",
    ) -> None:
        """Count a call answered with ``code`` (told ``detail``, for ``reason``); where the access log is
        on, log it, and where calls are traced, trace it, its duration's exemplar the ids of its span
        where sampled."""
        seconds = time.monotonic() - start
        self.metrics.requests.labels(rpc, code.name).inc()
        if reason:
            self.metrics.errors.labels(rpc, reason).inc()
        logged = self.access_log and not (self.access_log_errors_only and code is grpc.StatusCode.OK)
        exemplar = tracing.answered(rpc, code.name, seconds, context, detail, logged, reason)
        self.metrics.request_seconds.labels(rpc).observe(seconds, exemplar)  # (its span's ids, where sampled)

    # --- shared validation ---------------------------------------------------------------------

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _check_texts(self, texts: Any, field: str, repeated: bool = True, allow_empty: bool = False) -> list[str]:
        """Field names of texts within the count and byte limits; InvalidInput naming the first that is not."""
        lim = self.limits
        if len(texts) > lim.max_texts_per_request:
            raise InvalidInput(f"{field}: {len(texts)} texts exceed the limit of {lim.max_texts_per_request}")
        total = 0
        names = []
        for i, text in enumerate(texts):
            name = f"{field}[{i}]" if repeated else field
            if not text and not allow_empty:
                raise InvalidInput(f"{name}: must not be empty")
            # a character is at most 4 bytes: count the bytes only where the limit could be near
            size = len(text) if len(text) * 4 <= lim.max_text_bytes else len(text.encode("utf-8"))
            if size > lim.max_text_bytes:
                raise InvalidInput(f"{name}: {size} bytes exceed the limit of {lim.max_text_bytes} per text")
            total += size
            if total > lim.max_request_bytes:
                raise InvalidInput(f"{field}: more than {lim.max_request_bytes} bytes in one request, the limit")
            names.append(name)
        return names

    @staticmethod
    def _timings(queue: float, compute: float, start: float) -> pb.Timings:
        return pb.Timings(queue_seconds=queue, compute_seconds=compute, total_seconds=time.monotonic() - start)

    # --- RPCs --------------------------------------------------------------------------------

    async def encode(self, request: pb.EncodeRequest, deadline: float | None) -> Encoded:
        """Validate, tokenize and embed one request's texts: the work behind Encode and its v2 model."""
        engine = self._engine()
        if not request.texts:
            raise InvalidInput("texts: at least one text is required")
        fields = self._check_texts(request.texts, "texts")
        priority = self.priority(request.priority)
        engine.encoder.admit(len(fields), deadline, priority)  # refused now, untokenized, if it cannot be served
        cut = CUTS.get(request.truncation)
        fitted = await engine.fit(request.texts, cut, fields)
        pooling: Literal["mean", "last"] = "last" if request.pooling == pb.POOLING_LAST else "mean"
        queued = time.monotonic()
        out = await engine.encode([f[0] for f in fitted], pooling, request.normalize, deadline, priority)
        self._count_input(sum(out.token_counts))
        self._count_truncated("text", cut, sum(truncated for _, truncated in fitted))
        if tracing.active():
            said = {"attnserve.texts": len(fitted), "attnserve.priority": PRIORITIES[priority]}
            tracing.PHASES.set((queued, out.queue_seconds, out.compute_seconds, said))
        return Encoded(out, [cut for _, cut in fitted])

    def priority(self, asked: int) -> int:
        """The priority (an index of config.PRIORITIES) of the work of a call that asked ``asked`` (a
        pb.Priority): the one it asked, normal where it asked none; with API keys, its client's where
        its line in the keys file sets one and the call asks none or a higher one."""
        level = asked - 1 if asked else NORMAL
        client = CLIENT.get()
        if client is not None and self.limits_of is not None and (own := self.limits_of(client).priority):
            return max(level, own - 1) if asked else own - 1
        return level

    def _count_truncated(self, kind: str, cut: Cut, n: int) -> None:
        """Count ``n`` inputs of ``kind`` the model read cut at ``cut``."""
        if n and cut is not None:
            self.metrics.truncated.labels(kind, cut).inc(n)

    def _count_input(self, tokens: int) -> None:
        """Count ``tokens`` the model read for the call's client (with API keys)."""
        if (client := CLIENT.get()) is not None:
            counts = self.metrics.tokens_by_client
            counts[client, "input"] = counts.get((client, "input"), 0) + tokens

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        async def handle() -> pb.EncodeResponse:
            start = time.monotonic()
            done = await self.encode(request, self._deadline(context))
            out = done.output
            response = pb.EncodeResponse(dimensions=out.vectors.shape[1])
            add_embeddings(response.embeddings, out.vectors, out.token_counts, done.truncated)
            response.timings.CopyFrom(self._timings(out.queue_seconds, out.compute_seconds, start))
            return response

        return await self._call("Encode", context, handle)

    async def attention_map(self, request: pb.AttentionMapRequest, deadline: float | None) -> Attended:
        """Validate, tokenize and run one attention request: the work behind AttentionMap and its v2 model."""
        engine = self._engine()
        info = engine.runtime.info
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidInput("input: give text or token_ids")
        layers = self._select(request.layers, info.n_layer, "layers")
        heads = self._select(request.heads, info.n_head, "heads")
        truncate = CUTS.get(request.truncation)
        priority = self.priority(request.priority)
        if which == "text":
            self._check_texts([request.text], "text", repeated=False)
            engine.attender.admit(1, deadline, priority)
            ((ids, cut),) = await engine.fit([request.text], truncate, ["text"])
        else:
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidInput("token_ids.ids: must not be empty")
            bad = [i for i in ids if i >= info.vocab_size]
            if bad:
                raise InvalidInput(f"token_ids.ids: {some(bad)} not below vocab_size {info.vocab_size}")
            cut = len(ids) > info.max_seq_len
            if cut and truncate is None:
                raise InvalidInput(
                    f"token_ids.ids: {len(ids)} tokens exceed the model's context of {info.max_seq_len}; "
                    "shorten it or set truncation to TRUNCATION_END or TRUNCATION_START"
                )
            ids = ids[len(ids) - info.max_seq_len :] if cut and truncate == "start" else ids[: info.max_seq_len]
            engine.attender.admit(1, deadline, priority)
        itemsize = 2 if request.precision == pb.PRECISION_FP16 else 4
        release = self.attention_budget.take(len(layers) * len(heads) * len(ids) ** 2 * itemsize, CLIENT.get())
        try:
            queued = time.monotonic()
            out = await engine.attention(ids, layers, heads, deadline, priority)
        except BaseException:
            release()
            raise
        self._count_input(len(ids))
        self._count_truncated("text", truncate, cut)
        if tracing.active():
            said = {"attnserve.tokens": len(ids), "attnserve.priority": PRIORITIES[priority]}
            tracing.PHASES.set((queued, out.queue_seconds, out.compute_seconds, said))
        return Attended(out, ids, layers, heads, cut, release)

    async def AttentionMap(
        self, request: pb.AttentionMapRequest, context: grpc.aio.ServicerContext
    ) -> pb.AttentionMapResponse:
        async def handle() -> pb.AttentionMapResponse:
            start = time.monotonic()
            done = await self.attention_map(request, self._deadline(context))
            context.add_done_callback(lambda _: done.release())  # once the answer is sent, or the call gone
            out = done.output
            fp16 = request.precision == pb.PRECISION_FP16
            packed = np.asarray(out.probs, "<f2" if fp16 else "<f4").tobytes()  # no copy where it is <f4 already
            return pb.AttentionMapResponse(
                tokens=self._engine().token_strings(done.ids),
                token_ids=done.ids,
                shape=list(out.probs.shape),
                precision=pb.PRECISION_FP16 if fp16 else pb.PRECISION_FP32,
                probabilities=packed,
                layers=done.layers,
                heads=done.heads,
                truncated=done.truncated,
                timings=self._timings(out.queue_seconds, out.compute_seconds, start),
            )

        return await self._call("AttentionMap", context, handle)

    @staticmethod
    def _select(chosen: Any, count: int, field: str) -> list[int]:
        values = list(chosen)
        if not values:
            return list(range(count))
        bad = [v for v in values if v >= count]
        if bad:
            raise InvalidInput(f"{field}: {some(bad)} out of range; the model has {count} (0 to {count - 1})")
        if len(set(values)) != len(values):
            repeated = sorted(v for v, n in Counter(values).items() if n > 1)
            raise InvalidInput(f"{field}: {some(repeated)} repeated; give each at most once")
        return values

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async def handle() -> pb.TokenizeResponse:
            engine = self._engine()
            self._check_texts(request.texts, "texts", allow_empty=True)
            return pb.TokenizeResponse(
                tokenizations=[
                    pb.Tokenization(ids=ids, tokens=engine.token_strings(ids))
                    for ids in await engine.tokenize(request.texts)
                ]
            )

        return await self._call("Tokenize", context, handle)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        async def handle() -> pb.GetModelInfoResponse:
            engine = self._engine()
            info, limits = engine.runtime.info, engine.limits
            gen = self._scheduler().limits
            return pb.GetModelInfoResponse(
                name=info.name,
                version=info.version,
                config_json=json.dumps(public_config(info.raw), sort_keys=True),
                execution_provider=engine.runtime.provider,
                vocab_size=info.vocab_size,
                num_layers=info.n_layer,
                num_heads=info.n_head,
                hidden_size=info.d_model,
                limits=pb.Limits(
                    max_seq_len=info.max_seq_len,
                    max_texts_per_request=self.limits.max_texts_per_request,
                    max_batch_size=limits.max_batch_size,
                    max_batch_tokens=limits.max_batch_tokens,
                    max_new_tokens=gen.max_new_tokens,
                    max_queue_size=limits.max_queue_size,
                    max_queue_tokens=limits.max_queue_tokens,
                    max_text_bytes=self.limits.max_text_bytes,
                    max_request_bytes=self.limits.max_request_bytes,
                    max_concurrent_calls=self.max_concurrent_calls,
                    max_running_sequences=gen.max_running,
                    max_waiting_sequences=gen.max_waiting,
                    max_stop_sequences=MAX_STOP_SEQUENCES,
                    max_attention_bytes=self.limits.max_attention_bytes,
                    client=self._client_limits(),
                ),
                build=pb.BuildInfo(
                    attnserve_version=package_version(),
                    onnxruntime_version=onnxruntime.__version__,
                    grpc_version=grpc.__version__,
                    python_version=platform.python_version(),
                ),
            )

        return await self._call("GetModelInfo", context, handle)

    def _client_limits(self) -> pb.ClientLimits | None:
        """The caller's own limits, where the server has API keys (the guard set the call's client;
        without keys there is none)."""
        client = CLIENT.get()
        if client is None or self.limits_of is None:
            return None
        own = self.limits_of(client)
        return pb.ClientLimits(
            client=client,
            max_calls=own.max_calls,
            calls_per_second=own.rate,
            burst=own.burst if own.rate else 0,
            tokens_per_second=own.token_rate,
            token_burst=own.token_burst if own.token_rate else 0,
            priority=own.priority,  # type: ignore[arg-type]
        )

    async def _generation(
        self, request: pb.GenerateRequest, deadline: float | None
    ) -> tuple[list[int], SamplingParams, bool, int]:
        """The prompt's ids, the sampling parameters, whether the prompt's start was dropped, and the
        generation's priority."""
        scheduler = self._scheduler()
        priority = self.priority(request.priority)
        self.admit_generation(request, scheduler, deadline, priority)
        keep: int | None = None
        cut: Cut = None
        if request.truncation == pb.TRUNCATION_START:  # room for max_new_tokens, and for one prompt token
            context = scheduler.runtime.info.max_seq_len
            keep, cut = context - min(max(request.max_new_tokens, 1), context - 1), "start"
        hint = "set truncation to TRUNCATION_START"
        ((ids, truncated),) = await self._engine().fit([request.prompt], cut, ["prompt"], keep, hint)
        params = self.sampling(request, scheduler, ids)
        self._count_truncated("prompt", cut, truncated)  # (before it is queued)
        return ids, params, truncated, priority

    def admit_generation(
        self, request: pb.GenerateRequest, scheduler: Scheduler, deadline: float | None, priority: int = NORMAL
    ) -> None:
        """The checks before a prompt is tokenized: its size, its stop sequences', room in the queue
        and time before its deadline."""
        self._check_texts([request.prompt], "prompt", repeated=False)
        self._check_texts(request.stop, "stop")
        if request.truncation == pb.TRUNCATION_END:
            raise InvalidInput(
                "truncation: TRUNCATION_END would generate after the prompt's first tokens, not its end; "
                "TRUNCATION_START drops its first tokens instead"
            )
        # refused now, untokenized, when the queue is full or would outlast the deadline
        scheduler.admit(deadline, max(1, min(request.max_new_tokens, scheduler.limits.max_new_tokens)), priority)

    @staticmethod
    def sampling(request: pb.GenerateRequest, scheduler: Scheduler, ids: list[int]) -> SamplingParams:
        """The request's sampling parameters for the prompt ``ids``; InvalidInput naming what is wrong."""
        info = scheduler.runtime.info
        if len(ids) >= info.max_seq_len:
            raise InvalidInput(
                f"prompt: {len(ids)} tokens leave no room in the model's context of {info.max_seq_len}; "
                "shorten it or set truncation to TRUNCATION_START"
            )
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p or 1.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            stop=tuple(request.stop),
            seed=request.seed if request.HasField("seed") else None,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            return_attention=request.return_attention,
            attention_top_k=request.attention_top_k or 5,
        )
        problems = params.problems(scheduler.limits.max_new_tokens)
        if request.return_attention and "decoder_attn" not in scheduler.runtime.sessions:
            problems.append("return_attention: this model directory has no decoder_attn graph")
        if problems:
            raise InvalidInput("; ".join(problems))
        return params

    def _scheduler(self) -> Scheduler:
        return self._model().scheduler

    @staticmethod
    def _token(t: Token, token_text: list[str], into: Any) -> None:
        """Add t to ``into`` (a repeated GeneratedToken field), built in place: the bare token in one
        call, its alternatives and attention only where it has them (this runs for every token)."""
        out = into.add(token_id=t.id, text=t.text, logprob=t.logprob)
        if t.top:
            out.top_logprobs.extend(pb.TokenLogprob(token_id=i, text=token_text[i], logprob=lp) for i, lp in t.top)
        if t.attention:
            out.attention.extend(
                pb.LayerAttention(layer=layer, positions=pos, weights=w) for layer, pos, w in t.attention
            )

    @classmethod
    def stream_message(cls, group: list[Event], token_text: list[str]) -> pb.GenerateStreamResponse:
        """One message a group: stream_interval tokens (1 by default), more for a client that lags."""
        msg = pb.GenerateStreamResponse()
        for event in group:
            if isinstance(event, Token):
                msg.text += event.text
                if event.id >= 0:
                    cls._token(event, token_text, msg.tokens)
            else:
                msg.finish_reason = FINISH[event.finish]
                msg.usage.prompt_tokens = event.prompt_tokens
                msg.usage.generated_tokens = event.generated_tokens
        return msg

    @staticmethod
    def _trace_generation(queued: float, done: Done, priority: int) -> None:
        """The call's span's phases: waiting for a slot, and the generation's usage and priority."""
        attributes = {
            "attnserve.priority": PRIORITIES[priority],
            "attnserve.prompt_tokens": done.prompt_tokens,
            "attnserve.generated_tokens": done.generated_tokens,
            "attnserve.finish_reason": done.finish.value,
            "attnserve.time_to_first_token_seconds": done.time_to_first_token,
        }
        tracing.PHASES.set((queued, done.queue_seconds, None, attributes))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async def handle() -> pb.GenerateResponse:
            start = time.monotonic()
            deadline = self._deadline(context)
            tracing.choose_early(context)  # (its first token's exemplar names its span)
            ids, params, truncated, priority = await self._generation(request, deadline)
            scheduler = self._scheduler()
            token_text = self._engine().token_text
            reply = pb.GenerateResponse()
            reply.usage.prompt_truncated = truncated
            queued = time.monotonic()
            async for group in scheduler.generate(ids, params, deadline, stream=False, priority=priority):
                for event in group:
                    if isinstance(event, Token):
                        if event.id >= 0:
                            self._token(event, token_text, reply.tokens)
                        continue
                    reply.text = event.text
                    reply.finish_reason = FINISH[event.finish]
                    reply.usage.prompt_tokens = event.prompt_tokens
                    reply.usage.generated_tokens = event.generated_tokens
                    reply.timings.queue_seconds = event.queue_seconds
                    reply.timings.total_seconds = time.monotonic() - start
                    reply.time_to_first_token_seconds = event.time_to_first_token
                    if tracing.active():
                        self._trace_generation(queued, event, priority)
                    return reply
            raise RuntimeError("generation ended without a result")

        return await self._call("Generate", context, handle)

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # validate before the first message, so a bad request fails as a status, not mid-stream
        start = time.monotonic()
        deadline = self._deadline(context)
        tracing.choose_early(context)  # (its first token's exemplar names its span)
        try:
            ids, params, truncated, priority = await self._generation(request, deadline)
            scheduler = self._scheduler()
            token_text = self._engine().token_text
        except BaseException as e:
            self._unpin()
            if not isinstance(e, Exception):  # cancelled: the client went away
                raise
            failed = self.failure("GenerateStream", e, context)
            self._observe("GenerateStream", failed.code, start, context, failed.message, failed.reason)
            await context.abort(failed.code, failed.message, failed.trailers())
            raise
        code = grpc.StatusCode.OK
        traced = tracing.active()
        queued = time.monotonic()
        write = context.write  # (written here rather than yielded: a write the watch ends can still be answered)
        watch = self.write_watch
        writing = None if watch is None else watch.join()
        try:
            async for group in scheduler.generate(ids, params, deadline, priority=priority):
                if traced and isinstance(end := group[-1], Done):
                    self._trace_generation(queued, end, priority)
                message = self.stream_message(group, token_text)
                if truncated and message.HasField("usage"):
                    message.usage.prompt_truncated = True
                if writing is not None:
                    writing.since = time.monotonic()
                try:
                    await write(message)
                except Exception:  # gRPC could not send it: the call has ended on the wire, its client gone
                    code = grpc.StatusCode.CANCELLED
                    return
                if writing is not None:
                    writing.since = 0.0
        except asyncio.CancelledError:
            if watch is None or (said := watch.answer(writing, context)) is None:
                code = grpc.StatusCode.CANCELLED  # the client went away, or its deadline passed
                raise
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # ended by the watch, and answered
            self._observe("GenerateStream", code, start, context, said, STREAM_NOT_READ)
        except Exception as e:
            failed = self.failure("GenerateStream", e, context)
            code = failed.code
            self._observe("GenerateStream", code, start, context, failed.message, failed.reason)
            await context.abort(code, failed.message, failed.trailers())
            raise
        finally:
            if writing is not None:
                watch.streams.discard(writing)  # type: ignore[union-attr]
            self._unpin()
            if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                self._observe("GenerateStream", code, start, context)


# the end of a text over the context each Truncation drops (none: the text is refused)
CUTS: dict[int, Cut] = {pb.TRUNCATION_END: "end", pb.TRUNCATION_START: "start"}

FINISH = {
    Finish.LENGTH: pb.FINISH_REASON_LENGTH,
    Finish.STOP: pb.FINISH_REASON_STOP,
    Finish.END_OF_TEXT: pb.FINISH_REASON_END_OF_TEXT,
    Finish.CONTEXT_FULL: pb.FINISH_REASON_CONTEXT_FULL,
    Finish.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attnserve")
    except PackageNotFoundError:
        return "unknown"
