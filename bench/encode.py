"""``attnserve bench encode``: load over real gRPC against the limit the runtime sets in-process.

1. The limit: the runtime's own encode throughput at the best batch size, in this process.
2. A server process with batching on: a closed loop at fixed concurrency, an open loop of
   Poisson arrivals at a fixed rate, and single requests on the idle server.
3. The same server with batching off (max batch size 1), closed loop at the same concurrency.
4. The same closed loop with eight texts a request, where one call's cost is shared by eight.
5. The transport floor (``bench.transport``): the same loads against a server with no model, and
   from it the ceiling these cores allow a server while its load generator runs beside it.

Reports throughput and latency p50/p90/p99 as a table and JSON. A benchmark, not a test.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np

from bench.timing import accelerator, device_flags, machine, server_process
from bench.transport import ceiling_share, cpu_per_unit, floor_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.runtime import Runtime, RuntimeOptions

WORDS = (
    "the king and queen speak of love and death while the fool laughs at the crown "
    "my lord what news from the field the night is dark and full of ghosts"
).split()
BUNDLED = 8  # texts a request in the bundled load


def texts_of(rt: Runtime, tokens: int, count: int, seed: int = 0) -> list[str]:
    """Texts of exactly ``tokens`` tokens each (as the model's tokenizer counts them)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        words: list[str] = []
        while len(rt.tokenizer.encode(" ".join(words)).ids) < tokens:
            words.append(rng.choice(WORDS))
        text = " ".join(words)
        if len(rt.tokenizer.encode(text).ids) == tokens:
            out.append(text)
    return out


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {f"p{q}_ms": float(np.percentile(a, q)) for q in (50, 90, 99)}


def encode_rates(
    rt: Runtime, tokens: int, seconds: float, batches: tuple[int, ...]
) -> tuple[dict[int, float], dict[int, float]]:
    """The runtime's encode throughput (texts/s) and CPU per text (ms, all threads) at each batch size."""
    by_batch, cpu_ms = {}, {}
    for b in batches:
        ids = np.ones((b, tokens), np.int64)
        mask = np.ones_like(ids)
        rt.encode(ids, mask)
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            rt.encode(ids, mask)
            n += 1
        by_batch[b] = n * b / (time.perf_counter() - start)
        cpu_ms[b] = (time.process_time() - cpu) / (n * b) * 1e3
    return by_batch, cpu_ms


def in_process_limit(rt: Runtime, tokens: int, seconds: float) -> dict[str, Any]:
    by_batch, cpu_ms = encode_rates(rt, tokens, seconds, (1, 8, 16, 32, 64))
    best = max(by_batch, key=lambda k: by_batch[k])
    one = []
    ids1 = np.ones((1, tokens), np.int64)
    for _ in range(200):
        t = time.perf_counter()
        rt.encode(ids1, np.ones_like(ids1))
        one.append(time.perf_counter() - t)
    return {
        "texts_per_second_by_batch": by_batch,
        "best_batch": best,
        "limit_texts_per_second": by_batch[best],
        "cpu_ms_per_text": cpu_ms[best],  # all the process's threads, spinning ones included
        "batch1_p50_ms": statistics.median(one) * 1e3,
    }


async def closed_loop(
    address: str, texts: list[str], concurrency: int, seconds: float, per_request: int = 1
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        await stub.Encode(pb.EncodeRequest(texts=[texts[0]]))
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            k = i * per_request
            while time.perf_counter() < stop_at:
                batch = [texts[(k + j) % len(texts)] for j in range(per_request)]
                t = time.perf_counter()
                await stub.Encode(pb.EncodeRequest(texts=batch))
                latencies.append(time.perf_counter() - t)
                k += concurrency * per_request

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "texts_per_request": per_request,
        "requests": len(latencies),
        "texts": len(latencies) * per_request,
        "texts_per_second": len(latencies) * per_request / elapsed,
        **percentiles(latencies),
    }


async def open_loop(address: str, texts: list[str], rate: float, seconds: float, seed: int = 0) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second, whatever the server's pace."""
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        await stub.Encode(pb.EncodeRequest(texts=[texts[0]]))
        latencies: list[float] = []
        errors = 0

        async def one(text: str) -> None:
            nonlocal errors
            t = time.perf_counter()
            try:
                await stub.Encode(pb.EncodeRequest(texts=[text]), timeout=30)
                latencies.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError:
                errors += 1

        tasks = []
        start = time.perf_counter()
        next_at = start
        k = 0
        while next_at - start < seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(texts[k % len(texts)])))
            k += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "rate": rate,
        "requests": len(tasks),
        "errors": errors,
        "texts_per_second": len(latencies) / elapsed,
        **percentiles(latencies),
    }


async def idle_latency(address: str, text: str, n: int = 200) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        for _ in range(10):
            await stub.Encode(pb.EncodeRequest(texts=[text]))
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            await stub.Encode(pb.EncodeRequest(texts=[text]))
            lat.append(time.perf_counter() - t)
    return percentiles(lat)


def run(
    model_dir: Path,
    tokens: int = 64,
    concurrency: int = 32,
    seconds: float = 10.0,
    device: Literal["cpu", "cuda"] = "cpu",
    variant: Literal["fp32", "fp16"] = "fp32",
) -> dict[str, Any]:
    rt = Runtime(model_dir, RuntimeOptions(device=device, require_cuda=device == "cuda", variant=variant))
    texts = texts_of(rt, min(tokens, rt.info.max_seq_len), 64)
    limit = in_process_limit(rt, tokens, seconds=min(3.0, seconds / 3))
    dimensions = rt.info.d_model
    del rt
    result: dict[str, Any] = {
        "model": str(model_dir),
        "machine": machine(),
        "device": accelerator(device),
        "variant": variant,
        "tokens_per_text": tokens,
        "in_process": limit,
    }
    on_device = device_flags(device, variant)
    with server_process(model_dir, *on_device) as address:
        result["batching_on"] = {
            "closed": asyncio.run(closed_loop(address, texts, concurrency, seconds)),
            "idle": asyncio.run(idle_latency(address, texts[0])),
        }
        rate = 0.7 * result["batching_on"]["closed"]["texts_per_second"]
        result["batching_on"]["open"] = asyncio.run(open_loop(address, texts, rate, seconds))
        result["batching_on"]["bundled"] = asyncio.run(closed_loop(address, texts, concurrency, seconds, BUNDLED))
    with server_process(model_dir, *on_device, "--max-batch-size", "1") as address:
        result["batching_off"] = {"closed": asyncio.run(closed_loop(address, texts, concurrency, seconds))}
    floor_seconds = min(5.0, seconds)
    with floor_server(dimensions) as (address, pid):
        result["transport"] = {
            str(k): asyncio.run(
                cpu_per_unit(
                    pid, closed_loop(address, texts, concurrency, floor_seconds, k), lambda load: load["texts"]
                )
            )
            for k in (1, BUNDLED)
        }
    on = result["batching_on"]["closed"]["texts_per_second"]
    bundled = result["batching_on"]["bundled"]["texts_per_second"]
    model_ms = limit["cpu_ms_per_text"]
    result["summary"] = {
        "server_share_of_limit": on / limit["limit_texts_per_second"],
        "ceiling_share_of_limit": ceiling_share(
            limit["limit_texts_per_second"], model_ms, result["transport"]["1"]["cpu_ms"]
        ),
        "bundled_share_of_limit": bundled / limit["limit_texts_per_second"],
        "bundled_ceiling_share_of_limit": ceiling_share(
            limit["limit_texts_per_second"], model_ms, result["transport"][str(BUNDLED)]["cpu_ms"]
        ),
        "batching_gain": on / result["batching_off"]["closed"]["texts_per_second"],
        "idle_p50_minus_runtime_batch1_ms": result["batching_on"]["idle"]["p50_ms"] - limit["batch1_p50_ms"],
    }
    return result


def table(r: dict[str, Any]) -> str:
    lim = r["in_process"]
    lines = [
        f"encode, {r['tokens_per_text']} tokens a text, {r['machine']}; model on {r['device']} ({r['variant']})",
        f"in-process limit: {lim['limit_texts_per_second']:.0f} texts/s at batch {lim['best_batch']} "
        f"(batch 1: {lim['batch1_p50_ms']:.2f} ms)",
        f"{'load':<34}{'texts/s':>10}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}",
    ]
    rows = [
        (f"closed, {r['batching_on']['closed']['concurrency']} concurrent, batching on", r["batching_on"]["closed"]),
        (f"open, Poisson {r['batching_on']['open']['rate']:.0f}/s, batching on", r["batching_on"]["open"]),
        ("idle server, one at a time", {"texts_per_second": float("nan"), **r["batching_on"]["idle"]}),
        (f"closed, {r['batching_off']['closed']['concurrency']} concurrent, batching off", r["batching_off"]["closed"]),
        (f"closed, {BUNDLED} texts a request, batching on", r["batching_on"]["bundled"]),
    ]
    for name, row in rows:
        lines.append(
            f"{name:<34}{row['texts_per_second']:>10.0f}{row['p50_ms']:>10.2f}{row['p90_ms']:>10.2f}"
            f"{row['p99_ms']:>10.2f}"
        )
    s = r["summary"]
    lines.append(
        f"server / limit: {s['server_share_of_limit'] * 100:.0f}%; batching gain: "
        f"{s['batching_gain']:.2f}x; idle p50 - runtime batch-1: {s['idle_p50_minus_runtime_batch1_ms']:+.2f} ms"
    )
    t1, tb = r["transport"]["1"], r["transport"][str(BUNDLED)]
    lines.append(
        f"gRPC alone (no model), CPU a text, server + load generator: {t1['cpu_ms']:.3f} ms at one text a request, "
        f"{tb['cpu_ms']:.3f} ms at {BUNDLED}; model {lim['cpu_ms_per_text']:.3f} ms"
    )
    lines.append(
        f"ceiling on these cores: {s['ceiling_share_of_limit'] * 100:.0f}% of the limit at one text a request, "
        f"{s['bundled_ceiling_share_of_limit'] * 100:.0f}% at {BUNDLED}; "
        f"{BUNDLED} texts a request reached {s['bundled_share_of_limit'] * 100:.0f}%"
    )
    return "\n".join(lines)
