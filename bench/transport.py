"""What gRPC alone costs on this machine: the floor under ``bench encode`` and ``bench generate``.

A server process with the real API and no model (Encode answers a fixed vector, GenerateStream
sends its tokens as fast as it can) is loaded by the same clients the two benchmarks use. The CPU
time of each side, over the calls or stream messages made, is what one call or one message costs
before any model or scheduler work. With the model's own CPU time per text or per token, measured
in process, it gives the most a server on these cores could make of the in-process limit while its
load generator runs beside it:

    ceiling = cores / (model CPU per unit + transport CPU per unit), as a share of the limit.

Run as ``python -m bench.transport --port P --dimensions D --stream-interval N`` it is that server
on grpc.aio, as attnserve serves; with ``--threads N``, on grpc's thread-pool server instead (a
call holds one of N threads), to measure what that transport costs on the same loads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager, suppress
from typing import Any

import grpc

from bench.timing import running
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc


class FloorServicer(pb_grpc.AttnServeServicer):
    """The API with nothing behind it: replies shaped like the real ones, made without a model."""

    def __init__(self, dimensions: int, stream_interval: int) -> None:
        self.vector = [0.5] * dimensions
        self.interval = stream_interval

    def encoded(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
        return pb.EncodeResponse(
            embeddings=[pb.Embedding(values=self.vector, token_count=len(t) // 3) for t in request.texts],
            dimensions=len(self.vector),
        )

    def messages(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateStreamResponse]:
        n = request.max_new_tokens
        for start in range(0, n, self.interval):
            count = min(self.interval, n - start)
            msg = pb.GenerateStreamResponse(
                text=" x" * count, tokens=[pb.GeneratedToken(token_id=7, text=" x") for _ in range(count)]
            )
            if start + count == n:
                msg.finish_reason = pb.FINISH_REASON_LENGTH
                msg.usage.prompt_tokens = len(request.prompt) // 3
                msg.usage.generated_tokens = n
            yield msg

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        return self.encoded(request)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        for msg in self.messages(request):
            yield msg


class ThreadedFloorServicer(FloorServicer):
    """The same replies from plain methods, for grpc's thread-pool server: a call holds a thread."""

    def Encode(self, request: pb.EncodeRequest, context: grpc.ServicerContext) -> pb.EncodeResponse:  # type: ignore[override]
        return self.encoded(request)

    def GenerateStream(  # type: ignore[override]
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        return self.messages(request)


def serve_threaded(port: int, dimensions: int, stream_interval: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    pb_grpc.add_AttnServeServicer_to_server(ThreadedFloorServicer(dimensions, stream_interval), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    sys.stderr.write(f"gRPC on 127.0.0.1:{bound}\nserving the floor server on {threads} threads\n")
    sys.stderr.flush()
    server.wait_for_termination()


async def serve(port: int, dimensions: int, stream_interval: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_AttnServeServicer_to_server(FloorServicer(dimensions, stream_interval), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    sys.stderr.write(f"gRPC on 127.0.0.1:{bound}\nserving the floor server\n")
    sys.stderr.flush()
    await server.wait_for_termination()


def floor_server(
    dimensions: int, stream_interval: int = 1, cpus: set[int] | None = None, threads: int = 0
) -> AbstractContextManager[tuple[str, int]]:
    """The no-model server in its own process (on ``cpus`` only, if given) for the length of a
    with-block, on grpc.aio or, with ``threads``, on grpc's thread-pool server; yields its address and pid."""
    args = ["-m", "bench.transport", "--port", "0", "--dimensions", str(dimensions), "--threads", str(threads)]
    return running([*args, "--stream-interval", str(stream_interval)], cpus)


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, all its threads, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_unit(
    pid: int, load: Awaitable[dict[str, Any]], units: Callable[[dict[str, Any]], float]
) -> dict[str, Any]:
    """Runs ``load`` and divides the server's and this process's CPU time by the units it made."""
    server0, client0, wall0 = process_cpu_seconds(pid), time.process_time(), time.perf_counter()
    result = await load
    server1, client1, wall1 = process_cpu_seconds(pid), time.process_time(), time.perf_counter()
    n = units(result)
    return {
        "load": result,
        "units": n,
        "server_cpu_ms": (server1 - server0) / n * 1e3,
        "client_cpu_ms": (client1 - client0) / n * 1e3,
        "cpu_ms": ((server1 - server0) + (client1 - client0)) / n * 1e3,
        "cores_busy": ((server1 - server0) + (client1 - client0)) / (wall1 - wall0),
    }


def ceiling_share(limit_per_second: float, model_cpu_ms: float, transport_cpu_ms: float) -> float:
    """The most of ``limit_per_second`` these cores allow when each unit also costs ``transport_cpu_ms``."""
    cores = os.cpu_count() or 1
    best = cores / ((model_cpu_ms + transport_cpu_ms) * 1e-3)
    return min(1.0, best / limit_per_second)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dimensions", type=int, default=128)
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="serve on grpc's thread-pool server with this many threads")
    args = p.parse_args()
    with suppress(KeyboardInterrupt):
        if args.threads:
            serve_threaded(args.port, args.dimensions, args.stream_interval, args.threads)
        else:
            asyncio.run(serve(args.port, args.dimensions, args.stream_interval))


if __name__ == "__main__":
    main()
