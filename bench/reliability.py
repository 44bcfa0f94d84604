"""``attnserve bench reliability``: overload and a soak, run as an operator would meet them.

Overload: the server on one core (``--intra-op-threads 1``), this load generator on another.
Its capacity is measured first (closed loop, ``texts_per_request`` texts a request); then an
open loop of Poisson arrivals at ``overload`` times that rate, each call with a ``deadline``,
while a prober checks health every 100 ms with a 1 s deadline. Reported: every status code
seen, goodput (calls answered OK, all within their deadline) against capacity, how fast
refusals came, and the latency of accepted calls. The same for Generate (``generate``): a
prompt of a few words, up to ``max_new_tokens`` tokens, greedy, each call with its own
``generate_deadline``.

Reload: the same server under a steady load (closed loops of Encode calls and streamed
generations) while its model directory, a link, is swapped between two models ``reloads`` times,
each swap followed by SIGHUP. Reported: every status code seen (none should be other than OK),
how long each new model took to serve from the signal, the latency of the Encode calls that
overlapped a load against those that did not, and the server's resident memory and threads after
each model before it has stopped (growth there would be a model not let go).

Priorities: the server kept busy by bulk work (a closed loop of ``BULK_CALLS`` Encode calls of
``BULK_TEXTS`` texts each) while interactive calls of one text arrive at ``INTERACTIVE_RATE`` a
second (Poisson, each with a 2 s deadline), in rounds alternated between the two marked alike
(no priority: all normal) and marked apart (bulk PRIORITY_LOW, interactive PRIORITY_HIGH).
Reported: the interactive calls' latency and codes, and the bulk texts a second, in each way.
The same for generation: ``BULK_GENERATIONS`` closed loops of ``BULK_NEW_TOKENS``-token
generations, twice the slots, while interactive ones of ``INTERACTIVE_NEW_TOKENS`` arrive at
``INTERACTIVE_GENERATION_RATE`` a second.

Soak: mixed traffic (encode, attention maps, unary and streamed generation, streams cancelled
part-way, invalid requests) for ``soak_seconds``, sampling the server's resident memory,
threads and open file descriptors. Growth is measured from the end of the first tenth (once
allocators and caches have settled) to the end.

A benchmark, not a test: it prints its figures.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from bench.encode import percentiles, texts_of
from bench.timing import machine, start_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.runtime import Runtime, RuntimeOptions

SERVER_CPU, LOAD_CPU = 1, 0


def _drain(stream: Any) -> None:
    """Read the server's log as it comes, so that a full pipe never blocks it."""
    threading.Thread(target=lambda: collections.deque(stream, maxlen=200), daemon=True).start()


def _proc_status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
    return {"rss_kib": fields["VmRSS"], "threads": fields["Threads"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# the k-th call of a load, made on a stub with a deadline (seconds, or None)
Call = Callable[[pb_grpc.AttnServeStub, int, float | None], Awaitable[Any]]


def encode_calls(texts: list[str], per_request: int) -> Call:
    requests = [pb.EncodeRequest(texts=[texts[(k + j) % len(texts)] for j in range(per_request)]) for k in range(64)]
    return lambda stub, k, timeout: stub.Encode(requests[k % len(requests)], timeout=timeout)


# 32 prompts of a few words, each its own
PROMPTS = tuple(
    f"{subject} {verb} the"
    for subject in ("The king", "A fool", "My lord", "Good sir", "The night", "Her father", "This house", "Our queen")
    for verb in ("speaks to", "waits for", "laughs at", "looks upon")
)


def generate_calls(max_new_tokens: int) -> Call:
    requests = [pb.GenerateRequest(prompt=p, max_new_tokens=max_new_tokens) for p in PROMPTS]
    return lambda stub, k, timeout: stub.Generate(requests[k % len(requests)], timeout=timeout)


async def _capacity(stub: pb_grpc.AttnServeStub, call: Call, seconds: float) -> float:
    """Requests a second the server completes under a closed loop of 32."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal done
        k = i
        while time.perf_counter() < stop_at:
            await call(stub, k, None)
            done += 1
            k += 7

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(32)))
    return done / (time.perf_counter() - start)


async def _overload(address: str, call: Call, rate: float, seconds: float, deadline: float) -> dict[str, Any]:
    rng = random.Random(0)
    codes: collections.Counter[str] = collections.Counter()
    ok_latency: list[float] = []
    refused_latency: list[float] = []
    health_failures = health_checks = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        check = health_pb2_grpc.HealthStub(channel).Check

        async def one(k: int) -> None:
            t = time.perf_counter()
            try:
                await call(stub, k, deadline)
                codes["OK"] += 1
                ok_latency.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1
                if e.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    refused_latency.append(time.perf_counter() - t)

        async def prober(stop_at: float) -> None:
            nonlocal health_failures, health_checks
            while time.perf_counter() < stop_at:
                try:
                    reply = await check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    health_failures += reply.status != health_pb2.HealthCheckResponse.SERVING
                except grpc.aio.AioRpcError:
                    health_failures += 1
                health_checks += 1
                await asyncio.sleep(0.1)

        start = time.perf_counter()
        probe = asyncio.ensure_future(prober(start + seconds))
        tasks = []
        next_at = start
        k = 0
        while next_at - start < seconds:
            now = time.perf_counter()
            while next_at <= now:  # every arrival that is due, then a short sleep
                tasks.append(asyncio.ensure_future(one(k)))
                k += 1
                next_at += rng.expovariate(rate)
            await asyncio.sleep(min(0.002, max(0.0, next_at - time.perf_counter())))
        await asyncio.gather(*tasks)
        await probe
        elapsed = time.perf_counter() - start
    return {
        "offered_per_second": rate,
        "sent": len(tasks),
        "codes": dict(codes),
        "goodput_per_second": codes["OK"] / elapsed,
        "accepted": percentiles(ok_latency) if ok_latency else {},
        "refused": {**percentiles(refused_latency), "max_ms": max(refused_latency) * 1e3} if refused_latency else {},
        "health_checks": health_checks,
        "health_failures": health_failures,
    }


BULK_CALLS, BULK_TEXTS = 16, 16  # the bulk load's calls in progress, and texts a call
INTERACTIVE_RATE, INTERACTIVE_DEADLINE = 20.0, 2.0  # the interactive calls' arrivals a second, and deadline (s)
BULK_GENERATIONS, BULK_NEW_TOKENS = 32, 64  # generation: twice the default slots, so that 16 wait
INTERACTIVE_GENERATION_RATE, INTERACTIVE_NEW_TOKENS = 5.0, 8


async def _priority_round(
    address: str, texts: list[str], seconds: float, marked: bool, generate: bool = False
) -> dict[str, Any]:
    """One round of bulk and interactive work, with their priorities ``marked`` apart or not: Encode
    calls, or with ``generate`` generations."""
    low, high = (pb.PRIORITY_LOW, pb.PRIORITY_HIGH) if marked else (pb.PRIORITY_UNSPECIFIED,) * 2
    bulk: list[Any]
    if generate:
        workers_n, rate, units = BULK_GENERATIONS, INTERACTIVE_GENERATION_RATE, BULK_NEW_TOKENS
        bulk = [pb.GenerateRequest(prompt=p, max_new_tokens=units, temperature=0, priority=low) for p in PROMPTS]
        shorts = [
            pb.GenerateRequest(prompt=p, max_new_tokens=INTERACTIVE_NEW_TOKENS, temperature=0, priority=high)
            for p in PROMPTS
        ]
    else:
        workers_n, rate, units = BULK_CALLS, INTERACTIVE_RATE, BULK_TEXTS
        bulk = [
            pb.EncodeRequest(texts=[texts[(k + j) % len(texts)] for j in range(units)], priority=low)
            for k in range(len(texts))
        ]
        shorts = [pb.EncodeRequest(texts=[t], priority=high) for t in texts]
    rng = random.Random(1)
    latency: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    bulk_units = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        method = stub.Generate if generate else stub.Encode
        stop_at = time.perf_counter() + seconds

        async def bulk_worker(i: int) -> None:
            nonlocal bulk_units
            k = i
            while time.perf_counter() < stop_at:
                reply = await method(bulk[k % len(bulk)], timeout=60)
                bulk_units += reply.usage.generated_tokens if generate else units
                k += workers_n

        async def interactive(k: int) -> None:
            t = time.perf_counter()
            try:
                await method(shorts[k % len(shorts)], timeout=INTERACTIVE_DEADLINE)
                codes["OK"] += 1
                latency.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] += 1

        start = time.perf_counter()
        workers = [asyncio.ensure_future(bulk_worker(i)) for i in range(workers_n)]
        await asyncio.sleep(0.5)  # the bulk queue fills before the first interactive call
        calls, k = [], 0
        next_at = time.perf_counter()
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            calls.append(asyncio.ensure_future(interactive(k)))
            k += 1
            next_at += rng.expovariate(rate)
        await asyncio.gather(*calls, *workers)
        elapsed = time.perf_counter() - start
    return {
        "marked": marked,
        "interactive": percentiles(latency) if latency else {},
        "interactive_codes": dict(codes),
        f"bulk_{'tokens' if generate else 'texts'}_per_second": bulk_units / elapsed,
    }


def priorities(model_dir: Path, seconds: float, rounds: int = 2, tokens: int = 64) -> dict[str, Any]:
    """Rounds of bulk and interactive work, alternated between no priorities and priorities: Encode
    calls, then generations."""
    rt = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    texts = texts_of(rt, min(tokens, rt.info.max_seq_len), 64)
    del rt
    proc, port = start_server(model_dir, "--intra-op-threads", "1", cpus={SERVER_CPU})
    assert proc.stderr is not None
    _drain(proc.stderr)
    address = f"127.0.0.1:{port}"
    results: dict[str, list[dict[str, Any]]] = {"encode": [], "generate": []}
    try:
        for kind, rounds_of in results.items():
            for i in range(rounds):
                for marked in (False, True) if i % 2 == 0 else (True, False):
                    rounds_of.append(asyncio.run(_priority_round(address, texts, seconds, marked, kind == "generate")))
    finally:
        proc.terminate()
        proc.wait(60)
    return {
        "seconds": seconds,
        "bulk_calls": BULK_CALLS,
        "bulk_texts": BULK_TEXTS,
        "interactive_rate": INTERACTIVE_RATE,
        "tokens_per_text": tokens,
        "bulk_generations": BULK_GENERATIONS,
        "bulk_new_tokens": BULK_NEW_TOKENS,
        "interactive_generation_rate": INTERACTIVE_GENERATION_RATE,
        "interactive_new_tokens": INTERACTIVE_NEW_TOKENS,
        "rounds": results["encode"],
        "generate_rounds": results["generate"],
    }


def overload(
    model_dir: Path,
    seconds: float,
    factor: float,
    per_request: int,
    deadline: float,
    tokens: int = 64,
    max_new_tokens: int = 0,
) -> dict[str, Any]:
    """Encode calls of ``per_request`` texts of ``tokens`` tokens or, with ``max_new_tokens``,
    Generate calls of up to that many tokens."""
    if max_new_tokens:
        call = generate_calls(max_new_tokens)
    else:
        rt = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
        call = encode_calls(texts_of(rt, min(tokens, rt.info.max_seq_len), 64), per_request)
        del rt
    proc, port = start_server(model_dir, "--intra-op-threads", "1", cpus={SERVER_CPU})
    assert proc.stderr is not None
    _drain(proc.stderr)
    address = f"127.0.0.1:{port}"
    try:

        async def both() -> dict[str, Any]:
            async with grpc.aio.insecure_channel(address) as channel:
                capacity = await _capacity(pb_grpc.AttnServeStub(channel), call, max(5.0, seconds / 2))
            result = await _overload(address, call, factor * capacity, seconds, deadline)
            return {"capacity_per_second": capacity, **result}

        r = asyncio.run(both())
    finally:
        proc.terminate()
        proc.wait(60)
    r["goodput_share_of_capacity"] = r["goodput_per_second"] / r["capacity_per_second"]
    r.update(factor=factor, deadline_seconds=deadline)
    if max_new_tokens:
        r.update(max_new_tokens=max_new_tokens)
    else:
        r.update(texts_per_request=per_request, tokens_per_text=tokens)
    return r


async def _mixed(address: str, texts: list[str], seconds: float, pid: int) -> dict[str, Any]:
    rng = random.Random(1)
    samples: list[dict[str, float]] = []
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        stop_at = time.perf_counter() + seconds
        start = time.perf_counter()

        async def call(kind: str) -> None:
            try:
                if kind == "encode":
                    await stub.Encode(pb.EncodeRequest(texts=rng.sample(texts, rng.randint(1, 8))), timeout=10)
                elif kind == "attention":
                    await stub.AttentionMap(pb.AttentionMapRequest(text=rng.choice(texts)), timeout=10)
                elif kind == "generate":
                    await stub.Generate(
                        pb.GenerateRequest(prompt=rng.choice(texts)[:60], max_new_tokens=32), timeout=20
                    )
                elif kind == "stream":
                    call = stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=64), timeout=20)
                    n = rng.randint(1, 80)
                    async for _ in call:
                        n -= 1
                        if n == 0:  # a client that goes away part-way
                            call.cancel()
                            break
                else:
                    await stub.Encode(pb.EncodeRequest(texts=[""]), timeout=10)
                codes[f"{kind} OK"] += 1
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                name = e.code().name if isinstance(e, grpc.aio.AioRpcError) else "CANCELLED"
                codes[f"{kind} {name}"] += 1

        async def worker() -> None:
            kinds = ["encode"] * 5 + ["attention"] * 2 + ["generate", "stream", "invalid"]
            while time.perf_counter() < stop_at:
                await call(rng.choice(kinds))

        async def sampler() -> None:
            while time.perf_counter() < stop_at:
                samples.append({"t": time.perf_counter() - start, **_proc_status(pid)})
                await asyncio.sleep(max(1.0, seconds / 120))

        await asyncio.gather(sampler(), *(worker() for _ in range(8)))
    samples.append({"t": time.perf_counter() - start, **_proc_status(pid)})
    settled = next(s for s in samples if s["t"] >= seconds / 10)
    last = samples[-1]
    growth = {k: (last[k] - settled[k]) / settled[k] for k in ("rss_kib", "threads", "fds")}
    return {"seconds": seconds, "codes": dict(codes), "settled": settled, "last": last, "growth": growth,
            "samples": samples}  # fmt: skip


def soak(model_dir: Path, seconds: float) -> dict[str, Any]:
    rt = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    texts = texts_of(rt, min(32, rt.info.max_seq_len), 64)
    del rt
    proc, port = start_server(model_dir, cpus={SERVER_CPU})
    assert proc.stderr is not None
    _drain(proc.stderr)
    try:
        return asyncio.run(_mixed(f"127.0.0.1:{port}", texts, seconds, proc.pid))
    finally:
        proc.terminate()
        proc.wait(60)


def point(link: Path, target: Path) -> None:
    """``link`` to ``target``, swapped in one rename, as a model directory is replaced whole."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)


async def _reloading(
    address: str, proc: Any, link: Path, models: list[tuple[Path, str]], texts: list[str], seconds: float
) -> dict[str, Any]:
    codes: collections.Counter[str] = collections.Counter()
    calls: list[tuple[float, float]] = []  # Encode calls answered OK: (start, end)
    loads: list[dict[str, Any]] = []
    windows: list[tuple[float, float]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        stop_at = time.perf_counter() + seconds
        requests = [pb.EncodeRequest(texts=[t]) for t in texts]

        async def encoder(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await stub.Encode(requests[k % len(requests)], timeout=10)
                    codes["Encode OK"] += 1
                    calls.append((t, time.perf_counter()))
                except grpc.aio.AioRpcError as e:
                    codes[f"Encode {e.code().name}"] += 1
                k += 7

        async def streamer(i: int) -> None:
            while time.perf_counter() < stop_at:
                try:
                    request = pb.GenerateRequest(prompt=PROMPTS[i], max_new_tokens=64)
                    async for message in stub.GenerateStream(request, timeout=20):
                        if message.finish_reason:
                            codes["GenerateStream OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[f"GenerateStream {e.code().name}"] += 1

        async def reloader() -> None:
            every = seconds / (len(models) + 1)
            for target, version in models:
                await asyncio.sleep(every - 1.0)
                before = _proc_status(proc.pid)  # the model before has stopped since the last swap
                point(link, target)
                start = time.perf_counter()
                proc.send_signal(signal.SIGHUP)
                while (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)).version != version:
                    await asyncio.sleep(0.01)
                windows.append((start, time.perf_counter()))
                served = time.perf_counter() - start
                peak, until = 0, time.perf_counter() + 1.0
                while time.perf_counter() < until:  # both models held while the old one ends its calls
                    peak = max(peak, _proc_status(proc.pid)["rss_kib"])
                    await asyncio.sleep(0.02)
                loads.append({"seconds": served, "before": before, "peak_rss_kib": peak})

        await asyncio.gather(reloader(), *(encoder(i) for i in range(8)), *(streamer(i) for i in range(4)))
    await asyncio.sleep(1.0)
    last = _proc_status(proc.pid)
    during = [end - t for t, end in calls if any(t < b and end > a for a, b in windows)]
    outside = [end - t for t, end in calls if not any(t < b + 1.0 and end > a for a, b in windows)]
    return {
        "seconds": seconds,
        "codes": dict(codes),
        "loads": loads,
        "last": last,
        "during": {**percentiles(during), "max_ms": max(during) * 1e3, "calls": len(during)} if during else {},
        "outside": {**percentiles(outside), "max_ms": max(outside) * 1e3, "calls": len(outside)} if outside else {},
    }


def reload(model_dir: Path, seconds: float, reloads: int) -> dict[str, Any]:
    """The server on its core under load while its model directory changes ``reloads`` times."""
    rt = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    texts = texts_of(rt, min(64, rt.info.max_seq_len), 64)
    version = rt.info.version
    del rt
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        shutil.copytree(model_dir, other)
        config = json.loads((other / "config.json").read_text())
        config["version"] = f"{version}-other"
        (other / "config.json").write_text(json.dumps(config))
        link = Path(tmp) / "current"
        point(link, model_dir.resolve())
        models = [(other, config["version"]), (model_dir.resolve(), version)] * (reloads // 2) + [
            (other, config["version"])
        ] * (reloads % 2)
        proc, port = start_server(link, "--intra-op-threads", "1", cpus={SERVER_CPU})
        assert proc.stderr is not None
        _drain(proc.stderr)
        try:
            first = _proc_status(proc.pid)
            r = asyncio.run(_reloading(f"127.0.0.1:{port}", proc, link, models, texts, seconds))
        finally:
            proc.terminate()
            proc.wait(60)
    return {"first": first, "reloads": reloads, **r}


def run(
    model_dir: Path,
    part: str = "all",
    seconds: float = 15.0,
    overload_factor: float = 3.0,
    texts_per_request: int = 16,
    deadline: float = 2.0,
    max_new_tokens: int = 64,
    generate_deadline: float = 0.5,
    soak_seconds: float = 600.0,
    reloads: int = 6,
    reload_seconds: float = 42.0,
    priority_rounds: int = 2,
) -> dict[str, Any]:
    os.sched_setaffinity(0, {LOAD_CPU})  # the load generator's core; the server gets the other
    result: dict[str, Any] = {"model": str(model_dir), "machine": machine()}
    if part in ("all", "overload"):
        result["overload"] = overload(model_dir, seconds, overload_factor, texts_per_request, deadline)
    if part in ("all", "generate"):
        result["generate_overload"] = overload(
            model_dir, seconds, overload_factor, 1, generate_deadline, max_new_tokens=max_new_tokens
        )
    if part in ("all", "priority"):
        result["priority"] = priorities(model_dir, seconds, priority_rounds)
    if part in ("all", "reload"):
        result["reload"] = reload(model_dir, reload_seconds, reloads)
    if part in ("all", "soak"):
        result["soak"] = soak(model_dir, soak_seconds)
    return result


def _priority_lines(rounds: list[dict[str, Any]], units: str) -> list[str]:
    lines = []
    for one in rounds:
        i = one["interactive"]
        way = "bulk low, interactive high" if one["marked"] else "no priorities"
        lines.append(
            f"  {way:27}: interactive p50 {i.get('p50_ms', float('nan')):.1f} ms, "
            f"p99 {i.get('p99_ms', float('nan')):.1f} ms "
            f"({', '.join(f'{k} {v}' for k, v in sorted(one['interactive_codes'].items()))}); "
            f"bulk {one[f'bulk_{units}_per_second']:.0f} {units}/s"
        )
    return lines


def table(r: dict[str, Any]) -> str:
    lines = [f"reliability, {r['machine']}; server on core {SERVER_CPU}, load generator on core {LOAD_CPU}"]
    for o in (r[key] for key in ("overload", "generate_overload") if key in r):
        acc, ref = o.get("accepted", {}), o.get("refused", {})
        what = (
            f"Generate, up to {o['max_new_tokens']} tokens"
            if "max_new_tokens" in o
            else f"Encode, {o['texts_per_request']} texts a request ({o['tokens_per_text']} tokens each)"
        )
        lines += [
            f"overload: {o['factor']:.0f}x capacity, {what}, {o['deadline_seconds']:g} s deadlines",
            f"  capacity {o['capacity_per_second']:.0f} req/s; offered {o['offered_per_second']:.0f} req/s, "
            f"{o['sent']} calls",
            f"  codes: {', '.join(f'{k} {v}' for k, v in sorted(o['codes'].items()))}",
            f"  goodput {o['goodput_per_second']:.0f} req/s = {o['goodput_share_of_capacity'] * 100:.0f}% of capacity",
            f"  accepted: p50 {acc.get('p50_ms', float('nan')):.1f} ms, p99 {acc.get('p99_ms', float('nan')):.1f} ms; "
            f"refused: p50 {ref.get('p50_ms', float('nan')):.2f} ms, p99 {ref.get('p99_ms', float('nan')):.2f} ms, "
            f"max {ref.get('max_ms', float('nan')):.1f} ms",
            f"  health: {o['health_checks'] - o['health_failures']}/{o['health_checks']} checks SERVING within 1 s",
        ]
    if p := r.get("priority"):
        lines.append(
            f"priorities: {p['bulk_calls']} bulk Encode calls of {p['bulk_texts']} texts in progress, interactive "
            f"calls of one text at {p['interactive_rate']:g}/s ({p['tokens_per_text']} tokens a text), "
            f"{p['seconds']:g} s a round"
        )
        lines += _priority_lines(p["rounds"], "texts")
        lines.append(
            f"  generation: {p['bulk_generations']} bulk generations of {p['bulk_new_tokens']} tokens in progress "
            f"(16 slots), interactive ones of {p['interactive_new_tokens']} tokens at "
            f"{p['interactive_generation_rate']:g}/s"
        )
        lines += _priority_lines(p["generate_rounds"], "tokens")
    if m := r.get("reload"):
        d, o = m["during"], m["outside"]
        lines += [
            f"reload: {m['reloads']} new models in {m['seconds']:.0f} s under 8 Encode loops and 4 streams",
            f"  codes: {', '.join(f'{k} {v}' for k, v in sorted(m['codes'].items()))}",
            "  serving the new model after SIGHUP: " + ", ".join(f"{x['seconds']:.2f}" for x in m["loads"]) + " s",
            f"  Encode while a model loads: p50 {d.get('p50_ms', float('nan')):.1f} ms, "
            f"p99 {d.get('p99_ms', float('nan')):.1f} ms, max {d.get('max_ms', float('nan')):.1f} ms "
            f"({d.get('calls', 0)} calls); otherwise p50 {o.get('p50_ms', float('nan')):.1f} ms, "
            f"p99 {o.get('p99_ms', float('nan')):.1f} ms, max {o.get('max_ms', float('nan')):.1f} ms",
            "  resident memory before each load: "
            + " -> ".join(f"{x['before']['rss_kib'] / 1024:.0f}" for x in m["loads"])
            + f" -> {m['last']['rss_kib'] / 1024:.0f} MiB at the end (at start {m['first']['rss_kib'] / 1024:.0f}; "
            + "at most "
            + ", ".join(f"{x['peak_rss_kib'] / 1024:.0f}" for x in m["loads"])
            + " in the second after each new model served); "
            + "threads "
            + " -> ".join(str(x["before"]["threads"]) for x in m["loads"])
            + f" -> {m['last']['threads']}",
        ]
    if s := r.get("soak"):
        g, a, b = s["growth"], s["settled"], s["last"]
        lines += [
            f"soak: {s['seconds']:.0f} s of mixed traffic, {sum(s['codes'].values())} calls",
            f"  codes: {', '.join(f'{k} {v}' for k, v in sorted(s['codes'].items()))}",
            f"  resident memory {a['rss_kib'] / 1024:.1f} -> {b['rss_kib'] / 1024:.1f} MiB "
            f"({g['rss_kib'] * 100:+.1f}%), "
            f"threads {a['threads']} -> {b['threads']} ({g['threads'] * 100:+.1f}%), "
            f"fds {a['fds']} -> {b['fds']} ({g['fds'] * 100:+.1f}%), from t={a['t']:.0f} s to t={b['t']:.0f} s",
        ]
    return "\n".join(lines)
