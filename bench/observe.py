"""``attnserve bench observe``: what the server's own observability costs a call, on its core.

The server runs in this process, pinned to core 1 with one intra-op thread; a closed loop of 8
concurrent Encodes (a four-word text, with an API key and a W3C traceparent, sampled) runs in a
process of its own on core 0. In each round the same server serves the same load four ways, in an
order rotated from round to round: *plain* (no key checked, no access log, no traces), *keys* (the
key checked and counted by client), *keys + access log* (each call's record written by the log's
writer, to a file) and *keys + traces* (each call a span with its queue and compute, made by the
tracer's thread and exported over OTLP/gRPC by the SDK's, to a receiver that takes and drops them,
in a process of its own on core 0). Measured by the CPU clocks of the event loop's thread, of the
log writer's and of the tracer's two, not the process's: the machine's drift moves a whole
process's CPU a call by more than these costs. The figures are the medians of the rounds'
differences from *plain*.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.timing import machine, prelude
from service import logs, tracing
from service.config import ServerConfig
from service.server import Server
from service.tracing import Tracing

KEY = "key-for-the-bench"
TEXT = "the king is dead"
CONCURRENCY = 8

# the load, in a process of its own: CALLS Encodes, CONCURRENCY at once, each with the key
_LOAD = """
import sys, threading, grpc
from protos.attnserve.v1 import attnserve_pb2 as pb, attnserve_pb2_grpc as pb_grpc
address, calls, concurrency, key, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
stub = pb_grpc.AttnServeStub(grpc.insecure_channel(address))
parent = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
metadata = [("authorization", "Bearer " + key), ("x-request-id", "bench"), parent]
request = pb.EncodeRequest(texts=[text])
free, calls_made = threading.Semaphore(concurrency), []
for _ in range(calls):
    free.acquire()
    call = stub.Encode.future(request, metadata=metadata, timeout=30)
    call.add_done_callback(lambda _: free.release())
    calls_made.append(call)
for call in calls_made:
    call.result()
"""

# an OTLP/gRPC receiver that takes the spans and keeps none, in a process of its own: its port on stdout
_SINK = """
import sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as t, trace_service_pb2_grpc as g
class Sink(g.TraceServiceServicer):
    def Export(self, request, context):
        return t.ExportTraceServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(2))
g.add_TraceServiceServicer_to_server(Sink(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
sys.stdin.read()  # until the bench closes it
"""

MODES = ("plain", "keys", "keys + access log", "keys + traces")


class _Served:
    """The server on an event loop of its own thread, in this process."""

    def __init__(self, config: ServerConfig) -> None:
        self.server = Server(config)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="event-loop", daemon=True)
        self.thread.start()
        if not started.wait(120):
            raise RuntimeError("the server did not start")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0, 0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _cpu(thread: threading.Thread | None) -> float:
    """``thread``'s CPU time so far, in seconds (0 for none)."""
    if thread is None or thread.ident is None:
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def run(model_dir: Path, rounds: int = 8, calls: int = 2000, record_format: str = "json") -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})  # the server, and every thread it starts from now on
    level = logging.getLogger().level
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text(f"bench {KEY}\n")
        written = open(Path(tmp) / "access.log", "w")  # noqa: SIM115 (closed below, after the writer ends)
        logs.configure("INFO", record_format, written)
        config = ServerConfig(
            model_dir=model_dir, host="127.0.0.1", port=0, metrics_port=-1, device="cpu", intra_op_threads=1,
            api_keys_file=keys, api_keys_reload_seconds=0,
        )  # fmt: skip
        served = _Served(config)
        guard, servicer = served.server.guard, served.server.servicer
        address = f"127.0.0.1:{served.server.port}"
        load = prelude([sys.executable, "-c", _LOAD, address, str(calls), str(CONCURRENCY), KEY, TEXT], cpus={0})
        env = {**os.environ, "PYTHONPATH": str(root)}
        sink = subprocess.Popen(
            prelude([sys.executable, "-c", _SINK], cpus={0}), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env, cwd=root,
        )  # fmt: skip
        assert sink.stdout is not None
        before_tracing = set(threading.enumerate())
        tracer = Tracing(f"http://127.0.0.1:{sink.stdout.readline().strip()}", 1.0, {})
        tracer.start()
        tracing._current = None  # on only while its mode is measured
        loop_us: dict[str, list[float]] = {m: [] for m in MODES}
        writer_us: dict[str, list[float]] = {m: [] for m in MODES}
        tracer_us: dict[str, list[float]] = {m: [] for m in MODES}

        def tracers() -> float:  # the tracer's thread and the SDK's exporter, started with it
            return sum(_cpu(t) for t in set(threading.enumerate()) - before_tracing)

        def measure(mode: str) -> None:
            guard.accept_keys(None if mode == "plain" else {KEY: "bench"})
            servicer.access_log = guard.access_log = mode == "keys + access log"
            tracing._current = tracer if mode == "keys + traces" else None
            writer = logs.writer_thread()
            loop0, writer0, tracer0 = _cpu(served.thread), _cpu(writer), tracers()
            subprocess.run(load, check=True, env=env, cwd=root)
            if mode == "keys + traces":
                tracer.provider.force_flush(10_000)  # the spans made and sent
            time.sleep(0.3)  # the writer's last batch, and the tracer's
            loop_us[mode].append((_cpu(served.thread) - loop0) / calls * 1e6)
            writer_us[mode].append((_cpu(writer) - writer0) / calls * 1e6)
            tracer_us[mode].append((tracers() - tracer0) / calls * 1e6)

        try:
            for mode in MODES[2:]:  # a warm-up, not counted
                measure(mode)
                for figures in (loop_us, writer_us, tracer_us):
                    figures[mode].clear()
            for r in range(rounds):
                for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                    measure(mode)
        finally:
            tracing._current = tracer
            tracer.stop()
            sink.communicate("")
            served.stop()
            logs.configure(logging.getLevelName(level) if level else "WARNING")
            written.close()
            os.sched_setaffinity(0, before)

    def extra(figures: dict[str, list[float]], mode: str) -> float:
        return statistics.median(a - b for a, b in zip(figures[mode], figures["plain"], strict=True))

    return {
        "machine": machine(),
        "record_format": record_format,
        "rounds": rounds,
        "calls": calls,
        "loop_us": loop_us,
        "writer_us": writer_us,
        "tracer_us": tracer_us,
        "extra_loop_us": {m: extra(loop_us, m) for m in MODES[1:]},
        "extra_writer_us": {m: extra(writer_us, m) for m in MODES[1:]},
        "extra_tracer_us": {m: extra(tracer_us, m) for m in MODES[1:]},
        "plain_loop_us": statistics.median(loop_us["plain"]),
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"machine: {r['machine']}; server on core 1, {CONCURRENCY} concurrent Encodes of a four-word text on core 0",
        f"{r['rounds']} rounds of {r['calls']} calls; the access log in {r['record_format']}",
        f"the event loop's CPU a call, plain: {r['plain_loop_us']:.1f} us (median of the rounds)",
        "",
        "| mode | event loop, over plain | log writer, over plain | tracer's threads, over plain |",
        "|---|---|---|---|",
    ]
    for mode in MODES[1:]:
        loop, writer, tracer = (r[f"extra_{part}_us"][mode] for part in ("loop", "writer", "tracer"))
        lines.append(f"| {mode} | {loop:+.1f} us | {writer:+.1f} us | {tracer:+.1f} us |")
    return "\n".join(lines)
