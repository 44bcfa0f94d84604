"""Other designs of the serving path, measured beside attnserve by ``bench split --designs``.

attnserve serves on grpc.aio: each call is a task on one event loop, its batch runs in an
executor thread and comes back through the loop. On one core gRPC alone costs 0.31 ms a call
that way and 0.19-0.21 ms on grpc's thread-pool server (``bench.transport --threads``), so these
two put the thread-pool server in front of the model and differ in what stands behind it:

* ``bridge``: attnserve's own engine and servicer code (validation, admission, tokenizing, the
  asyncio batcher) on an event loop of its own thread; each call's thread hands its request to
  that loop and waits for the answer. The least change to attnserve: four thread hops a call.
* ``threaded``: no event loop. The call's thread validates, tokenizes, and queues its texts on
  a batcher made of a lock, a condition and one batch thread; the batch thread forms batches
  within attnserve's ``max_batch_size`` and ``max_batch_tokens`` from what is queued when the
  model is free (as attnserve's batcher does), runs them and wakes the callers: two hops a
  call. A call that goes away or whose deadline passes leaves the queue before its batch forms.

The threaded design also serves GenerateStream: attnserve's scheduler (the same continuous
batching, sampling and stop rules) on its own thread with no event loop behind it, each step's
tokens handed straight to the callers' threads, one wake-up a stream a step where grpc.aio
needs one wake-up of the loop for all of them.

A third keeps attnserve whole and changes only the transport in front of it:

* ``grpclib``: grpclib, a gRPC server written in Python on asyncio (HTTP/2 framing by h2), in front
  of attnserve's own call guard, servicer, batchers and scheduler, all on one event loop as
  attnserve runs them. No gRPC threads: the loop reads and writes the sockets itself, where
  grpc.aio's poller thread wakes the loop for every completion, and a stream message is written
  without waiting for one. With no model it costs a fifth to a third less than grpc.aio a call
  and a third to two fifths less a stream message on one core (bench/REPORT.md).

All keep what a caller sees: the servicer's input checks and their INVALID_ARGUMENT messages,
requests, latency, batch size and compute time in the real metrics. They serve Encode (and the
threaded and grpclib ones GenerateStream) only: prototypes for a measurement, not servers to deploy.

    python -m bench.designs --design threaded|bridge|grpclib --model-dir DIR --port 0 [--workers 64]
        [--stream-interval N]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.batcher import BatchLimits
from service.config import ServerConfig
from service.engine import Engine
from service.errors import DeadlineExceeded, InvalidInput, status_for
from service.guard import CallGuard
from service.metrics import Metrics
from service.runtime import Runtime, RuntimeOptions, pad_right
from service.sampling import SamplingParams
from service.scheduler import Done, Event, GenerationLimits, Scheduler, Sequence
from service.server import SERVICE_NAME
from service.servicer import AttnServeServicer, RequestLimits, add_embeddings
from service.tokens import TextTokenizer

DESIGNS = ("bridge", "threaded", "grpclib")
STREAMING_DESIGNS = ("threaded", "grpclib")  # those that also serve GenerateStream
NO_DEADLINE = 86400.0  # seconds: what grpc's thread-pool server says is left of a call without a deadline exceeds this


def response(vectors: np.ndarray, counts: list[int], truncated: list[bool]) -> pb.EncodeResponse:
    out = pb.EncodeResponse(dimensions=vectors.shape[1])
    add_embeddings(out.embeddings, vectors, counts, truncated)  # as attnserve's servicer builds them
    return out


def abort(context: grpc.ServicerContext, e: Exception) -> None:
    failed = status_for(e)
    context.abort(failed.code, failed.message)


class BridgeServicer(pb_grpc.AttnServeServicer):
    """The thread-pool server in front of attnserve's servicer and engine, which run on a loop of their own."""

    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.native = AttnServeServicer(metrics, RequestLimits())
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="bridge-loop", daemon=True).start()

        async def start() -> None:
            engine = Engine(runtime, BatchLimits(), metrics, batch_nice=10)
            engine.start()
            self.native.attach(engine, None)  # type: ignore[arg-type]  # Encode only: no scheduler

        asyncio.run_coroutine_threadsafe(start(), self.loop).result()

    def Encode(self, request: pb.EncodeRequest, context: grpc.ServicerContext) -> pb.EncodeResponse:
        start = time.monotonic()
        left = context.time_remaining()
        work = self.native.encode(request, start + left if left < NO_DEADLINE else None)
        try:
            done = asyncio.run_coroutine_threadsafe(work, self.loop).result()
        except Exception as e:
            self.native._observe("Encode", status_for(e)[0], start, context)
            abort(context, e)
        self.native._observe("Encode", grpc.StatusCode.OK, start, context)
        out = done.output
        return response(out.vectors, out.token_counts, done.truncated)


@dataclass
class Waiting:
    """One call's texts in the threaded batcher's queue."""

    ids: list[np.ndarray]
    done: threading.Event = field(default_factory=threading.Event)
    vectors: np.ndarray | None = None  # (texts, 2, d): mean and last pooling
    error: Exception | None = None
    gone: bool = False  # its caller went away: not worth a place in a batch


class ThreadBatcher:
    """A queue under a lock and one thread that runs what is queued whenever the model is free."""

    def __init__(self, runtime: Runtime, metrics: Metrics, limits: BatchLimits | None = None) -> None:
        self.runtime = runtime
        limits = limits or BatchLimits()  # attnserve's own: 32 texts, 1,024 padded tokens on one CPU thread
        self.max_batch_size = limits.max_batch_size
        self.max_batch_tokens = limits.max_batch_tokens
        self.queue: deque[Waiting] = deque()
        self.ready = threading.Condition()
        self.batch_size = metrics.batch_size.labels("encode")
        self.compute_seconds = metrics.compute_seconds.labels("encode")
        threading.Thread(target=self._run, name="batch", daemon=True).start()

    def submit(self, ids: list[np.ndarray]) -> Waiting:
        w = Waiting(ids)
        with self.ready:
            self.queue.append(w)
            self.ready.notify()
        return w

    def _take(self) -> list[Waiting]:
        with self.ready:
            while not self.queue:
                self.ready.wait()
            batch: list[Waiting] = []
            texts = longest = 0
            while self.queue:
                w = self.queue[0]
                wider = max(longest, *(len(x) for x in w.ids))
                more = texts + len(w.ids)  # a call's texts stay together; it joins while both limits hold
                if batch and not w.gone and (more > self.max_batch_size or more * wider > self.max_batch_tokens):
                    break
                self.queue.popleft()
                if not w.gone:
                    batch.append(w)
                    texts += len(w.ids)
                    longest = wider
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                continue
            start = time.monotonic()
            try:
                out = self.runtime.encode(*pad_right([x for w in batch for x in w.ids]))
                vectors = np.stack([out.pooled_mean, out.pooled_last], axis=1)  # (texts, 2, d)
            except Exception as e:  # every caller of this batch hears of it, and no other
                for w in batch:
                    w.error = e
                    w.done.set()
                continue
            self.compute_seconds.observe(time.monotonic() - start)
            self.batch_size.observe(len(batch))
            i = 0
            for w in batch:
                w.vectors = vectors[i : i + len(w.ids)]
                i += len(w.ids)
                w.done.set()


@dataclass
class ThreadSequence(Sequence):
    """A sequence whose caller waits in a thread of its own for what each step hands it."""

    arrived: deque[Event | BaseException] = field(default_factory=deque)  # appended by the loop, taken by the caller
    ready: threading.Event = field(default_factory=threading.Event)


class ThreadScheduler(Scheduler):
    """attnserve's scheduler with no event loop behind it: each step's tokens go straight to the
    callers' threads, one wake-up a stream a step (on grpc.aio one wake-up of the loop serves them all)."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="attnserve-scheduler", daemon=True)
        self._thread.start()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        woken: dict[int, ThreadSequence] = {}
        for seq, event in outbox:
            assert isinstance(seq, ThreadSequence)
            seq.arrived.append(event)
            woken[seq.id] = seq
        for seq in woken.values():
            seq.ready.set()

    def stream(
        self, prompt: list[int], params: SamplingParams, deadline: float | None, context: grpc.ServicerContext
    ) -> Iterator[list[Event]]:
        """As ``Scheduler.generate`` streams, for a caller's thread; a caller that goes away cancels it."""
        self.admit()
        seq = self._sequence(ThreadSequence, prompt, params, deadline, stream=True)
        self._enqueue(seq)

        def gone() -> None:
            seq.cancelled = True
            self._wake.set()

        context.add_callback(gone)
        try:
            while True:
                while not seq.arrived:
                    seq.ready.wait()
                    seq.ready.clear()  # then look again: what came before the clear is in arrived
                group: list[Event] = []
                while seq.arrived:
                    event = seq.arrived.popleft()
                    if isinstance(event, BaseException):
                        raise event
                    group.append(event)
                yield group
                if isinstance(group[-1], Done):
                    return
        finally:
            gone()  # no-op once done; otherwise the loop drops it before the next step


class ThreadedServicer(pb_grpc.AttnServeServicer):
    """No event loop: the call's own thread validates, tokenizes, queues and answers."""

    def __init__(self, runtime: Runtime, metrics: Metrics, stream_interval: int = 1) -> None:
        self.runtime = runtime
        self.checks = AttnServeServicer(metrics, RequestLimits())  # the same input checks, messages and metrics
        self.batcher = ThreadBatcher(runtime, metrics)
        self.token_ids = TextTokenizer(runtime.tokenizer)
        self.scheduler = ThreadScheduler(runtime, GenerationLimits(stream_interval=stream_interval), metrics)
        self.scheduler.start()

    def Encode(self, request: pb.EncodeRequest, context: grpc.ServicerContext) -> pb.EncodeResponse:
        start = time.monotonic()
        try:
            if not request.texts:
                raise InvalidInput("texts: at least one text is required")
            self.checks._check_texts(request.texts, "texts")
            limit, cut = self.runtime.info.max_seq_len, request.truncation == pb.TRUNCATION_END
            ids = self.token_ids(request.texts)
            for i, x in enumerate(ids):
                if len(x) > limit and not cut:
                    raise InvalidInput(f"texts[{i}]: {len(x)} tokens exceed the model's context of {limit}")
            truncated = [len(x) > limit for x in ids]
            ids = [x[:limit] for x in ids]
            waiting = self.batcher.submit([np.asarray(x, np.int64) for x in ids])
            context.add_callback(lambda: setattr(waiting, "gone", True))
            left = context.time_remaining()  # a call without a deadline has ~forever, too long to wait on
            if not waiting.done.wait(left if left < NO_DEADLINE else None):
                waiting.gone = True
                raise DeadlineExceeded("deadline passed while the request was queued")
            if waiting.error is not None:
                raise waiting.error
        except Exception as e:
            self.checks._observe("Encode", status_for(e)[0], start, context)
            abort(context, e)
        self.checks._observe("Encode", grpc.StatusCode.OK, start, context)
        assert waiting.vectors is not None
        vectors = waiting.vectors[:, 1] if request.pooling == pb.POOLING_LAST else waiting.vectors[:, 0]
        if request.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return response(vectors, [len(x) for x in ids], truncated)

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            left = context.time_remaining()
            deadline = start + left if left < NO_DEADLINE else None
            self.checks.admit_generation(request, self.scheduler, deadline)
            (ids,) = self.token_ids([request.prompt])
            params = self.checks.sampling(request, self.scheduler, ids)
            for group in self.scheduler.stream(ids, params, deadline, context):
                yield self.checks.stream_message(group, self.runtime.token_text)
        except GeneratorExit:  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code = status_for(e)[0]
            abort(context, e)
        finally:
            self.checks._observe("GenerateStream", code, start, context)


class CallOnLoop:
    """What attnserve's guard and servicer ask of a call, for a call that grpclib serves."""

    __slots__ = ("stream",)

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def time_remaining(self) -> float | None:
        deadline = self.stream.deadline
        return None if deadline is None else deadline.time_remaining()

    async def read(self) -> Any:
        """The call's request (the guard reads it, as it does from grpc.aio's calls)."""
        message = await self.stream.recv_message()
        return grpc.aio.EOF if message is None else message

    async def write(self, message: Any) -> None:
        """One of the call's answers (a generation stream's messages are written, as to grpc.aio's calls)."""
        await self.stream.send_message(message)

    async def abort(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        """Answer ``code`` with ``message`` (the trailing metadata given, the error's google.rpc.Status
        among it, is not sent: grpclib sends its own details as messages, not bytes)."""
        from grpclib.const import Status
        from grpclib.exceptions import GRPCError

        raise GRPCError(Status(code.value[0]), message)


class GrpclibFront:
    """grpclib's handlers for Encode and GenerateStream, each run through the wrappers attnserve's guard
    puts around grpc.aio's handlers (checks, admission, calls in flight), then attnserve's servicer."""

    def __init__(self, servicer: AttnServeServicer, guard: CallGuard) -> None:
        # the guard hands grpc these as taking a stream of requests, and reads the one request itself
        self.encode_call = guard._wrap(
            f"/{SERVICE_NAME}/Encode", grpc.unary_unary_rpc_method_handler(servicer.Encode)
        ).stream_unary
        self.stream_call = guard._wrap(
            f"/{SERVICE_NAME}/GenerateStream", grpc.unary_stream_rpc_method_handler(servicer.GenerateStream)
        ).stream_stream

    def __mapping__(self) -> dict[str, Any]:
        from grpclib.const import Cardinality, Handler

        service = f"/{SERVICE_NAME}"
        return {
            f"{service}/Encode": Handler(self.encode, Cardinality.UNARY_UNARY, pb.EncodeRequest, pb.EncodeResponse),
            f"{service}/GenerateStream": Handler(
                self.generate_stream, Cardinality.UNARY_STREAM, pb.GenerateRequest, pb.GenerateStreamResponse
            ),
        }

    async def encode(self, stream: Any) -> None:
        await stream.send_message(await self.encode_call(None, CallOnLoop(stream)))

    async def generate_stream(self, stream: Any) -> None:
        await self.stream_call(None, CallOnLoop(stream))  # (it writes its messages with the call's write)


async def serve_grpclib(model_dir: Path, port: int, stream_interval: int) -> None:
    """attnserve's engine, scheduler, guard and servicer, set up as ``service.server`` sets them up,
    behind grpclib's server instead of grpc.aio's."""
    from grpclib.server import Server as GrpclibServer

    config = ServerConfig(model_dir=model_dir, device="cpu", intra_op_threads=1, stream_interval=stream_interval)
    runtime = Runtime(model_dir, config.runtime_options())
    metrics = Metrics()
    servicer = AttnServeServicer(metrics, config.request_limits())
    guard = CallGuard(
        metrics,
        (SERVICE_NAME,),
        config.max_concurrent_calls,
        config.max_probe_streams,
        config.request_read_timeout_seconds,
    )
    engine = Engine(runtime, config.batch_limits(False, runtime.cpu_threads), metrics, config.batch_nice)
    engine.start()
    scheduler = Scheduler(runtime, config.generation_limits(), metrics)
    scheduler.start()
    servicer.attach(engine, scheduler)
    # made with its protocol named: asyncio and grpclib turn Nagle's algorithm off only on sockets that say
    # IPPROTO_TCP, and with it on, a call's frames wait for the client's delayed acknowledgement (40 ms)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", port))
    server = GrpclibServer([GrpclibFront(servicer, guard)])
    await server.start(sock=sock)
    sys.stderr.write(f"gRPC on 127.0.0.1:{sock.getsockname()[1]}\nserving the grpclib design\n")
    sys.stderr.flush()
    await server.wait_closed()


def serve(design: str, model_dir: Path, port: int, workers: int, stream_interval: int = 1) -> None:
    if design == "grpclib":
        asyncio.run(serve_grpclib(model_dir, port, stream_interval))
        return
    runtime = Runtime(model_dir, RuntimeOptions(device="cpu", intra_op_threads=1, spin=False))
    metrics = Metrics()
    servicer = (
        BridgeServicer(runtime, metrics) if design == "bridge" else ThreadedServicer(runtime, metrics, stream_interval)
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_AttnServeServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    sys.stderr.write(f"gRPC on 127.0.0.1:{bound}\nserving the {design} design\n")
    sys.stderr.flush()
    server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", choices=DESIGNS, required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workers", type=int, default=64, help="the thread-pool server's threads: calls served at once")
    p.add_argument("--stream-interval", type=int, default=1, help="tokens a GenerateStream message")
    args = p.parse_args()
    serve(args.design, args.model_dir, args.port, args.workers, args.stream_interval)


if __name__ == "__main__":
    main()
