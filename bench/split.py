"""``attnserve bench split``: the server's own cost, measured the way serving benchmarks are run on one host.

The server is pinned to one core (``--intra-op-threads 1``) and the load generator to the other,
so the load generator's Python does not take the server's CPU; the limit is measured in this
process on the server's core with the same single thread. The share of that limit a server
reaches is what its own machinery (gRPC, validation, tokenizing, queueing, response building)
leaves to the model.

1. The limit on the server's core: encode texts/s by batch size; for generation, the real
   scheduler runs the streaming load in this process with the model's calls timed, so the limit
   is the model's own CPU per token on that load (a decode step's cost grows with the tokens
   cached, 0.46 ms at 8 to 1.39 ms at 250 for 16 rows here: a step at one fixed length would
   misstate it), and what the scheduler alone makes of it, without gRPC.
2. Encode, 64-token texts, 32 concurrent, 1 and 8 texts a request, and 1 text a request at 1, 2
   and 4 concurrent, in interleaved rounds against attnserve and against a plain peer
   (``bench.plain``: grpc.aio running the model per request), both on the same core; the idle p50
   of each; the server's CPU time per text.
3. GenerateStream: 16 streams one token a message, 16 streams ``--stream-interval 4``, and one
   stream (its inter-token latency against the batch-1 step).
   Shares are paired too: every measurement of a server stands between two timings of its load's
   limit in this process (the encode rate at the limit's batch size; the streaming load run by the
   scheduler in process), one before and one after, and is taken against their mean; gRPC alone (a
   server with no model) runs the same loads in the same rounds; a share, and the most gRPC alone
   allows, is the median of the rounds' own.
   The two latencies (one stream's inter-token p50 against the batch-1 step, an idle Encode's p50
   against the batch-1 encode) are paired: each round times the model in this process on the
   server's core right before the same measurement over gRPC, and the figure is the median of the
   rounds' differences, so that the machine's speed, which drifts by 10-30% over a run here, falls
   on both sides of each difference. The idle Encode, the noisiest figure and a cheap one, has
   four rounds for each of the stream's, and in each the servers (attnserve, the plain peer, the
   no-model server) take their turns in an order rotated from round to round, so that none is
   always measured first or last, where a drift of the machine's would fall on it alone.
   Each difference is then taken apart in the same rounds:
   gRPC's own share (the same measurement against a server with no model behind it), the model's
   slowdown when the core idles between calls (the batch-1 encode timed after a pause, as an idle
   server runs it), and what is left, the server's own.
4. With ``--profile``: py-spy samples the server under the 1-text and the 16-stream loads; the
   functions where its CPU goes, by own time and by time within them.

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.designs import DESIGNS, STREAMING_DESIGNS
from bench.encode import closed_loop as encode_loop
from bench.encode import encode_rates, idle_latency, texts_of
from bench.generate import NEW_TOKENS, prompts_of
from bench.generate import closed_loop as generate_loop
from bench.timing import machine, prelude, running, serve_args
from bench.transport import cpu_per_unit, floor_server
from export.timing import median_seconds
from service.metrics import Metrics
from service.runtime import Runtime, RuntimeOptions
from service.sampling import SamplingParams
from service.scheduler import GenerationLimits, Scheduler

SERVER_CORE, LOAD_CORE = 1, 0
LONG = "long"  # the encode load of texts as long as the model's context, 1 a request
BUNDLED = 8
GROUPED = 4
LONG_BATCHES = (1, 2, 4, 8, 16, 32)
FEW = (1, 2, 4)  # concurrencies below the main loads', 1 text a request: where there is little to batch
FLOOR_THREADS = 64  # the thread-pool floor server's threads: more than the loads' concurrent calls
TOKENS = 64  # the encode loads' texts, but for the long ones
LIMIT_SECONDS = 1.0  # the in-process limit for a load, timed before and after each server runs it


@contextmanager
def on_core(core: int) -> Iterator[None]:
    """This thread (and the threads it starts) on ``core`` alone for the length of a with-block."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def runtime_on_core(model_dir: Path) -> Runtime:
    """The runtime as the server runs it: one intra-op thread, made on the server's core."""
    with on_core(SERVER_CORE):
        return Runtime(model_dir, RuntimeOptions(device="cpu", intra_op_threads=1, spin=False))


def limit_on_core(model_dir: Path, tokens: int, seconds: float) -> dict[str, Any]:
    """The runtime alone on the server's core, one intra-op thread, as the server runs it."""
    with on_core(SERVER_CORE):
        rt = runtime_on_core(model_dir)
        by_batch, cpu_ms = encode_rates(rt, tokens, seconds, (1, 8, 16, 32))
        one = np.ones((1, tokens), np.int64)
        batch1 = median_seconds(lambda: rt.encode(one, np.ones_like(one)), runs=300, warmup=0)
        steps = {}
        for b in (1, 16):
            cache = rt.new_cache(b)
            tok = np.ones((b, 1), np.int64)

            def step(cache: Any = cache, tok: np.ndarray = tok) -> None:
                cache.lengths[:] = min(64, rt.info.max_seq_len - 1)
                rt.decode_step(cache, tok, tok)

            steps[b] = median_seconds(step, runs=300)
        texts = texts_of(rt, min(tokens, rt.info.max_seq_len), 64)
        # texts that fill the model's context, where the batch's size costs the model most on a CPU
        long_tokens = rt.info.max_seq_len
        long_by_batch, _ = encode_rates(rt, long_tokens, seconds, LONG_BATCHES)
        long_texts = texts_of(rt, long_tokens, 32, seed=1)
        prompts = prompts_of(rt, 64, hi=max(8, min(64, rt.info.max_seq_len - NEW_TOKENS - 1)))
        generation = {str(n): asyncio.run(generation_in_process(rt, prompts, n, 2 * seconds)) for n in (1, 16)}
    best = max(by_batch, key=lambda k: by_batch[k])
    return {
        "encode_texts_per_second_by_batch": by_batch,
        "encode_limit": by_batch[best],
        "encode_best_batch": best,
        "encode_cpu_ms_per_text": cpu_ms[best],
        "encode_batch1_p50_ms": batch1 * 1e3,
        "step_at_64_ms": {str(b): s * 1e3 for b, s in steps.items()},
        "generation": generation,
        # the model's own time per token on the 16-stream load, and its batch-1 step on the 1-stream load
        "generate_limit_16": generation["16"]["limit_tokens_per_second"],
        "long_tokens": long_tokens,
        "encode_long_by_batch": long_by_batch,
        "encode_long_limit": max(long_by_batch.values()),
        "texts": texts,
        "long_texts": long_texts,
        "prompts": prompts,
        "dimensions": rt.info.d_model,
    }


async def generation_in_process(rt: Runtime, prompts: list[str], streams: int, seconds: float) -> dict[str, Any]:
    """The real scheduler on the streaming load (``streams`` closed loops, the requests ``bench.generate``
    sends), in this process, with the model's calls timed by the CPU time of the thread that makes them.
    The limit is what the model alone allows on this load: generated tokens / the model's CPU time."""
    calls: dict[str, list[float]] = {"prefill": [], "decode_step": []}  # CPU seconds of each call

    def timed(name: str) -> Any:
        real = getattr(rt, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            t = time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                calls[name].append(time.thread_time() - t)

        return call

    ids = [rt.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    rt.prefill, rt.decode_step = timed("prefill"), timed("decode_step")  # type: ignore[method-assign]
    scheduler = Scheduler(rt, GenerationLimits(max_new_tokens=NEW_TOKENS), Metrics())
    scheduler.start()
    tokens = 0
    stop_at = time.perf_counter() + seconds

    async def stream(i: int) -> None:
        nonlocal tokens
        k = i
        while time.perf_counter() < stop_at:
            params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=40, seed=k)
            async for group in scheduler.generate(ids[k % len(ids)], params, None):
                tokens += sum(1 for e in group if getattr(e, "id", -1) >= 0)
            k += streams

    try:
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(stream(i) for i in range(streams)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        await scheduler.stop()
        del rt.prefill, rt.decode_step  # the class's own methods again
    prefill_seconds = sum(calls["prefill"])
    model_seconds = prefill_seconds + sum(calls["decode_step"])
    return {
        "streams": streams,
        "tokens": tokens,
        "limit_tokens_per_second": tokens / model_seconds,
        "scheduler_tokens_per_second": tokens / elapsed,
        "model_cpu_ms_per_token": model_seconds / tokens * 1e3,
        "prefill_share": prefill_seconds / model_seconds,
        "step_p50_ms": statistics.median(calls["decode_step"]) * 1e3,
        "cpu_ms_per_token": cpu / tokens * 1e3,
    }


def pinned_server(cmd: list[str]) -> AbstractContextManager[tuple[str, int]]:
    """A server on the server's core for the length of a with-block: its address and pid."""
    return running(cmd, cpus={SERVER_CORE})


def attnserve_cmd(model_dir: Path, *flags: str) -> list[str]:
    return serve_args(model_dir, "--intra-op-threads", "1", *flags)


def design_cmd(model_dir: Path, design: str, *flags: str) -> list[str]:
    return ["-m", "bench.designs", "--design", design, "--model-dir", str(model_dir), *flags]


def plain_cmd(model_dir: Path) -> list[str]:
    return ["-m", "bench.plain", "--model-dir", str(model_dir), "--intra-op-threads", "1"]


def profile(pid: int, seconds: float, load: Any) -> dict[str, Any]:
    """py-spy samples of the server (every thread, native frames left out) while ``load`` runs."""
    local = Path(sys.executable).parent / "py-spy"
    spy_bin = str(local) if local.exists() else shutil.which("py-spy")
    if spy_bin is None:
        load.close()
        return {"error": "py-spy is not installed (the dev extra has it)"}
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        command = [spy_bin, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                   "--format", "raw", "--output", out.name, "--nonblocking", "--threads"]  # fmt: skip
        spy = subprocess.Popen(prelude(command, {LOAD_CORE}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        asyncio.run(load)
        _, err = spy.communicate(timeout=seconds + 60)
        text = Path(out.name).read_text()
    if not text:
        return {"error": err.decode()[-500:]}
    return summarize(text)


def summarize(folded: str, top: int = 12) -> dict[str, Any]:
    """From py-spy's folded stacks: the share of samples per function, by own time and inclusive,
    and per thread."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        total += n
        threads[_thread_name(thread)] += n
        names = [_function(f) for f in frames]
        if names:
            own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    return {
        "samples": total,
        "own": [(name, n / total) for name, n in own.most_common(top)],
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(top)],
        "threads": [(name, n / total) for name, n in threads.most_common(6)],
    }


def _function(frame: str) -> str:
    """'handle (service/servicer.py:120)' -> 'servicer.handle'."""
    name, _, where = frame.partition(" (")
    path = where.split(":")[0]
    module = Path(path).stem if path else "?"
    return f"{module}.{name}"


def _thread_name(frame: str) -> str:
    """py-spy's thread frame, 'thread (8929): MainThread' (0.4) or 'thread (0x1) "MainThread"', -> its
    name, a trailing number left off so that a pool's threads count together ('batch-1' -> 'batch')."""
    _, _, rest = frame.partition(")")
    name = rest.lstrip(":").strip().strip('"') or frame
    return name.rstrip("0123456789-_ ") or name


IDLE_PAUSE_S = 0.001  # between in-process batch-1 encodes timed at an idle server's pace


def paced_median_seconds(fn: Callable[[], object], pause_s: float, runs: int) -> float:
    """Median wall time of fn over ``runs`` calls, each after ``pause_s`` of sleep (not timed): the core
    idles between calls, as it does between the requests of one client waiting for each answer."""
    times = []
    for _ in range(runs):
        time.sleep(pause_s)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rotated(names: list[str], round_: int) -> list[str]:
    """The order the servers are measured in, round by round: each takes every place in turn, forwards
    and backwards, so that a drift of the machine's speed falls on none more than on the others."""
    k = round_ % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if (round_ // len(names)) % 2 else order


IDLE_ROUNDS = 4  # idle rounds for each latency round: an idle Encode is the noisiest figure, and cheap


def paired_latency(
    model_dir: Path,
    servers: dict[str, str],
    texts: list[str],
    prompts: list[str],
    seconds: float,
    rounds: int,
    floor: str | None = None,
    idle_rounds: int | None = None,
) -> dict[str, Any]:
    """``rounds`` rounds of one stream: its decode step timed in process on the server's core, then
    one stream over gRPC against attnserve. Then ``idle_rounds`` (``IDLE_ROUNDS`` a round unless
    given) of an idle Encode: the batch-1 encode in process, back to back and then at an idle
    server's pace (a pause before each call, so the core idles between them as it does between idle
    requests), then an idle Encode against each of ``servers`` (name -> address), in an order
    rotated from round to round. With ``floor`` (the no-model server's address) each round also takes
    gRPC's own share of its latency: one stream's inter-token p50, and an idle Encode's round trip
    (in the rotation with the servers), with no model behind them. The differences are taken within
    a round."""
    rt = runtime_on_core(model_dir)
    ids = np.ones((1, min(64, rt.info.max_seq_len)), np.int64)
    steps: list[float] = []
    batch1: list[float] = []
    paced: list[float] = []
    ones: list[dict[str, Any]] = []
    idle: dict[str, list[float]] = {name: [] for name in servers}
    floor_idle: list[float] = []
    floor_itl: list[float] = []

    def encode() -> None:
        rt.encode(ids, np.ones_like(ids))

    for _ in range(rounds):
        with on_core(SERVER_CORE):
            steps.append(asyncio.run(generation_in_process(rt, prompts, 1, seconds))["step_p50_ms"])
        ones.append(asyncio.run(generate_loop(servers["attnserve"], prompts, 1, seconds)))
        if floor is not None:
            floor_itl.append(asyncio.run(generate_loop(floor, prompts, 1, seconds / 4))["itl_p50_ms"])
    idle_at = {name: (address, idle[name]) for name, address in servers.items()}
    if floor is not None:
        idle_at[""] = (floor, floor_idle)
    for r in range(IDLE_ROUNDS * rounds if idle_rounds is None else idle_rounds):
        with on_core(SERVER_CORE):
            batch1.append(median_seconds(encode, runs=300) * 1e3)
            paced.append(paced_median_seconds(encode, IDLE_PAUSE_S, runs=300) * 1e3)
        for name in rotated(list(idle_at), r):
            address, into = idle_at[name]
            into.append(asyncio.run(idle_latency(address, texts[0]))["p50_ms"])
    itl_minus_step = [one["itl_p50_ms"] - step for one, step in zip(ones, steps, strict=True)]
    middle = sorted(range(rounds), key=lambda i: itl_minus_step[i])[rounds // 2]
    result: dict[str, Any] = {
        "step_p50_ms": steps,
        "itl_p50_ms": [one["itl_p50_ms"] for one in ones],
        "itl_minus_step_ms": itl_minus_step,
        "one_stream": ones[middle],  # the round whose difference is the median
        "batch1_p50_ms": batch1,
        "batch1_paced_p50_ms": paced,
        "idle_p50_ms": idle,
        "idle_minus_batch1_ms": {name: [v - b for v, b in zip(vs, batch1, strict=True)] for name, vs in idle.items()},
    }
    if floor is not None:
        # what is left of each latency once gRPC's own share and the model's (at the load's pace) are taken out
        result |= {
            "floor_idle_p50_ms": floor_idle,
            "floor_itl_p50_ms": floor_itl,
            "idle_own_ms": {
                name: [v - p - f for v, p, f in zip(vs, paced, floor_idle, strict=True)] for name, vs in idle.items()
            },
            "itl_own_ms": [d - f for d, f in zip(itl_minus_step, floor_itl, strict=True)],
        }
    return result


def texts_made(r: dict[str, Any]) -> float:
    return float(r["texts"])


def tokens_made(r: dict[str, Any]) -> float:
    return float(r["tokens"])


def by_cpu(r: dict[str, Any]) -> float:
    return float(r["server_cpu_ms"])


def rates_of(rounds: list[dict[str, Any]], name: str) -> list[float]:
    """Each round's rate (``cpu_per_unit``'s results): texts_per_second or output_tokens_per_second."""
    return [float(r["load"][name]) for r in rounds]


def share(rates: list[float], limits: list[float]) -> float:
    """The median of the rounds' ratios: each round's rate over what it is paired with in that round
    (the limit timed around it, or the plain peer's rate)."""
    return statistics.median(r / lim for r, lim in zip(rates, limits, strict=True))


def middle(rounds: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """The round whose value is the median (the lower of the two middle ones for an even count)."""
    return sorted(rounds, key=value)[(len(rounds) - 1) // 2]


def round_limit(rt: Runtime, tokens: int, batch: int, seconds: float) -> dict[str, float]:
    """The runtime's encode rate (texts/s) and CPU a text (ms) at one batch size, timed on the server's core now."""
    with on_core(SERVER_CORE):
        by_batch, cpu_ms = encode_rates(rt, tokens, seconds, (batch,))
    return {"per_second": by_batch[batch], "cpu_ms": cpu_ms[batch]}


def generation_limit(rt: Runtime, prompts: list[str], seconds: float) -> dict[str, float]:
    """The 16-stream load's limit (tokens/s) and the model's CPU a token (ms), timed on the server's core
    now, and the share of it the scheduler alone makes in process."""
    with on_core(SERVER_CORE):
        g = asyncio.run(generation_in_process(rt, prompts, 16, seconds))
    return {
        "per_second": g["limit_tokens_per_second"],
        "cpu_ms": g["model_cpu_ms_per_token"],
        "scheduler_share": g["scheduler_tokens_per_second"] / g["limit_tokens_per_second"],
    }


def measured(pid: int, load: Callable[[], Any], units: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """``cpu_per_unit`` of the server ``pid`` under a load made now by ``load()``."""
    return asyncio.run(cpu_per_unit(pid, load(), units))


Measure = tuple[Callable[[], dict[str, Any]], list[dict[str, Any]]]  # a measurement, and where its result goes


def bracketed(time_limit: Callable[[], dict[str, float]], measures: list[Measure]) -> list[dict[str, float]]:
    """Each measurement between two timings of the limit, the first before it and the second after,
    and given their mean as its ``limit``: the timings chain, one after each measurement serving the
    next. Returns the timings, in order."""
    chain = [time_limit()]
    for measure, into in measures:
        result = measure()
        chain.append(time_limit())
        result["limit"] = {k: (chain[-2][k] + chain[-1][k]) / 2 for k in chain[-1]}
        into.append(result)
    return chain


def share_of_limit(rounds: list[dict[str, Any]], rate: str) -> float:
    """The median of the rounds' rates against the limit each was measured between."""
    return share(rates_of(rounds, rate), [r["limit"]["per_second"] for r in rounds])


def run(
    model_dir: Path,
    seconds: float = 5.0,
    rounds: int = 3,
    concurrency: int = 32,
    with_profile: bool = False,
    designs: bool = False,
    limit_seconds: float = LIMIT_SECONDS,
) -> dict[str, Any]:
    os.sched_setaffinity(0, {LOAD_CORE})  # the load generator's core, and this process's from now on
    limit = limit_on_core(model_dir, TOKENS, min(2.0, seconds))
    texts, prompts, dimensions = limit.pop("texts"), limit.pop("prompts"), limit.pop("dimensions")
    long_texts = limit.pop("long_texts")
    result: dict[str, Any] = {
        "model": str(model_dir),
        "machine": f"{machine()}; server on core {SERVER_CORE}, load on core {LOAD_CORE}",
        "limit": limit,
        "concurrency": concurrency,
    }
    servers = {"attnserve": attnserve_cmd(model_dir), "plain": plain_cmd(model_dir)}
    if designs:
        servers |= {name: design_cmd(model_dir, name) for name in DESIGNS}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in servers}
    # each encode load by key: (concurrent calls, texts a request, the texts, (their tokens, the limit's batch))
    short = (TOKENS, limit["encode_best_batch"])
    long = (limit["long_tokens"], max(limit["encode_long_by_batch"], key=lambda b: limit["encode_long_by_batch"][b]))
    loads = (
        {str(k): (concurrency, k, texts, short) for k in (1, BUNDLED)}
        | {f"c{c}": (c, 1, texts, short) for c in FEW}
        | {LONG: (concurrency, 1, long_texts, long)}
    )
    rt = runtime_on_core(model_dir)
    gen_seconds = 2 * seconds
    chains: dict[str, list[list[dict[str, float]]]] = {key: [] for key in [*loads, "generate"]}
    # by load: attnserve's at 1 and GROUPED tokens a message, and with designs those of the designs that stream
    stream_keys = ["16", f"16x{GROUPED}"]
    if designs:
        stream_keys += [f"{design}/{key}" for design in STREAMING_DESIGNS for key in stream_keys]
    streaming: dict[str, list[dict[str, Any]]] = {key: [] for key in stream_keys}
    # gRPC alone on the server's core, a server with no model (grpc.aio, and grpc's thread-pool server)
    floor_runs: dict[str, dict[str, list[dict[str, Any]]]] = {"aio": {}, "threads": {}}
    with ExitStack() as stack:
        pids = {name: stack.enter_context(pinned_server(cmd)) for name, cmd in servers.items()}
        ours, our_pid = pids["attnserve"]
        streamers = {
            "16": pids["attnserve"],
            f"16x{GROUPED}": stack.enter_context(
                pinned_server(attnserve_cmd(model_dir, "--stream-interval", str(GROUPED)))
            ),
        }
        for design in STREAMING_DESIGNS if designs else ():
            streamers[f"{design}/16"] = pids[design]
            streamers[f"{design}/16x{GROUPED}"] = stack.enter_context(
                pinned_server(design_cmd(model_dir, design, "--stream-interval", str(GROUPED)))
            )
        floors = {
            "aio": stack.enter_context(floor_server(dimensions, 1, cpus={SERVER_CORE})),
            "threads": stack.enter_context(floor_server(dimensions, 1, cpus={SERVER_CORE}, threads=FLOOR_THREADS)),
        }
        floor_grouped = stack.enter_context(floor_server(dimensions, GROUPED, cpus={SERVER_CORE}))
        # every measurement stands between two timings of its load's limit in this process, and its
        # share is against their mean: this machine's speed drifts by 10-30% over a run and moves
        # within a minute, and a limit timed once at the start misread every later share
        for _ in range(rounds):
            for key, (calls, k, some, (tokens, batch)) in loads.items():
                servers_here = [(runs[name], address, pid) for name, (address, pid) in pids.items()]
                if key in ("1", str(BUNDLED)):
                    servers_here += [(floor_runs[name], address, pid) for name, (address, pid) in floors.items()]
                measures: list[Measure] = [
                    (
                        partial(measured, pid, partial(encode_loop, address, some, calls, seconds, k), texts_made),
                        into.setdefault(key, []),
                    )
                    for into, address, pid in servers_here
                ]
                chains[key].append(bracketed(partial(round_limit, rt, tokens, batch, limit_seconds), measures))
            measures = [
                (
                    partial(measured, pid, partial(generate_loop, address, prompts, 16, gen_seconds), tokens_made),
                    streaming[key],
                )
                for key, (address, pid) in streamers.items()
            ]
            for name, (address, pid), key in (
                ("aio", floors["aio"], "16"),
                ("threads", floors["threads"], "16"),
                ("aio", floor_grouped, f"16x{GROUPED}"),
            ):
                load = partial(generate_loop, address, prompts, 16, seconds)
                measures.append((partial(measured, pid, load, tokens_made), floor_runs[name].setdefault(key, [])))
            chains["generate"].append(bracketed(partial(generation_limit, rt, prompts, seconds), measures))
        latency_of = {name: pids[name][0] for name in ("attnserve", "plain")}
        result["paired"] = paired = paired_latency(
            model_dir, latency_of, texts, prompts, 2 * seconds, rounds, floor=floors["aio"][0]
        )
        if with_profile:
            result["profile_encode"] = profile(our_pid, seconds, encode_loop(ours, texts, concurrency, seconds, 1))
            result["profile_generate"] = profile(our_pid, seconds, generate_loop(ours, prompts, 16, seconds))
    result["limit_chains"] = chains
    result["shares"] = {
        name: {key: share_of_limit(rs, "texts_per_second") for key, rs in by_k.items()} for name, by_k in runs.items()
    }
    result["shares"]["generate"] = {
        key: share_of_limit(rs, "output_tokens_per_second") for key, rs in streaming.items()
    }
    # the most one core allows, round by round: a unit costs the model's CPU and gRPC's alone (the floor)
    result["ceilings"] = {
        name: {
            key: statistics.median(
                ceiling(f["limit"]["cpu_ms"], f["server_cpu_ms"], f["limit"]["per_second"]) for f in fs
            )
            for key, fs in by_k.items()
        }
        for name, by_k in floor_runs.items()
    }
    result["generate"] = {
        key: middle(rs, lambda r: r["load"]["output_tokens_per_second"]) for key, rs in streaming.items()
    }
    result["generate"]["1"] = paired["one_stream"]
    # gRPC alone, the round of median cost for each load it ran (the thread-pool server ran no grouped streams)
    named = {
        "1": "encode_1",
        str(BUNDLED): f"encode_{BUNDLED}",
        "16": "generate_16x1",
        f"16x{GROUPED}": f"generate_16x{GROUPED}",
    }
    result["floor"], result["floor_threads"] = (
        {named[key]: middle(fs, by_cpu) for key, fs in floor_runs[transport].items()}
        for transport in ("aio", "threads")
    )
    result["encode"] = {
        name: {
            k: {
                "texts_per_second": statistics.median(r["load"]["texts_per_second"] for r in rs),
                "rounds": [r["load"]["texts_per_second"] for r in rs],
                "p50_ms": statistics.median(r["load"]["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["load"]["p99_ms"] for r in rs),
                "server_cpu_ms_per_text": statistics.median(r["server_cpu_ms"] for r in rs),
                "client_cpu_ms_per_text": statistics.median(r["client_cpu_ms"] for r in rs),
            }
            for k, rs in by_k.items()
        }
        for name, by_k in runs.items()
    }
    enc, gen, lim = result["encode"], result["generate"], limit
    sh, ceil = result["shares"], result["ceilings"]
    gen_timings = [g for chain in chains["generate"] for g in chain]
    idle_apart = idle_minus_plain(result["paired"])
    result["summary"] = {
        # each a median of the rounds' shares, each against the limit timed around its measurement
        "encode_1_share": sh["attnserve"]["1"],
        "encode_8_share": sh["attnserve"][str(BUNDLED)],
        "plain_1_share": sh["plain"]["1"],
        "plain_8_share": sh["plain"][str(BUNDLED)],
        "encode_long_share": sh["attnserve"][LONG],
        "plain_long_share": sh["plain"][LONG],
        "generate_16_share": sh["generate"]["16"],
        "generate_16_grouped_share": sh["generate"][f"16x{GROUPED}"],
        # the streaming designs' streams, where they ran (None where not)
        **{
            f"{design}_generate_16{grouped}_share": sh["generate"].get(f"{design}/16{load}")
            for design in STREAMING_DESIGNS
            for grouped, load in (("", ""), ("_grouped", f"x{GROUPED}"))
        },
        # the start's limit, timed once before every round: what the shares read against it
        "encode_1_share_of_start_limit": enc["attnserve"]["1"]["texts_per_second"] / lim["encode_limit"],
        "encode_8_share_of_start_limit": enc["attnserve"][str(BUNDLED)]["texts_per_second"] / lim["encode_limit"],
        # paired within rounds (paired_latency): the medians of the rounds' differences
        "single_stream_itl_minus_step_ms": statistics.median(result["paired"]["itl_minus_step_ms"]),
        "idle_p50_minus_batch1_ms": statistics.median(result["paired"]["idle_minus_batch1_ms"]["attnserve"]),
        "plain_idle_p50_minus_batch1_ms": statistics.median(result["paired"]["idle_minus_batch1_ms"]["plain"]),
        # the same two differences taken apart: gRPC's own share (a server with no model), the model's
        # slowdown at an idle server's pace, and what is left, the server's own
        "floor_idle_p50_ms": statistics.median(result["paired"]["floor_idle_p50_ms"]),
        "batch1_paced_minus_batch1_ms": statistics.median(
            p - b
            for p, b in zip(result["paired"]["batch1_paced_p50_ms"], result["paired"]["batch1_p50_ms"], strict=True)
        ),
        "idle_own_ms": statistics.median(result["paired"]["idle_own_ms"]["attnserve"]),
        "plain_idle_own_ms": statistics.median(result["paired"]["idle_own_ms"]["plain"]),
        # the two servers side by side, round by round (their order rotated)
        "idle_minus_plain_ms": statistics.median(idle_apart),
        "idle_under_plain_rounds": sum(d < 0 for d in idle_apart),
        "floor_itl_p50_ms": statistics.median(result["paired"]["floor_itl_p50_ms"]),
        "itl_own_ms": statistics.median(result["paired"]["itl_own_ms"]),
        "encode_server_overhead_ms_per_text": enc["attnserve"]["1"]["server_cpu_ms_per_text"]
        - lim["encode_cpu_ms_per_text"],
        "generate_server_cpu_ms_per_token_16": gen["16"]["server_cpu_ms"],
        "generate_model_cpu_ms_per_token_16": statistics.median(g["cpu_ms"] for g in gen_timings),
        # the most one core allows when each unit costs the model's CPU and gRPC's alone (the floor)
        "ceiling_encode_1": ceil["aio"]["1"],
        "ceiling_encode_8": ceil["aio"][str(BUNDLED)],
        "ceiling_generate_16": ceil["aio"]["16"],
        "ceiling_generate_16_grouped": ceil["aio"][f"16x{GROUPED}"],
        "scheduler_in_process_share": statistics.median(g["scheduler_share"] for g in gen_timings),
        "ceiling_threads_encode_1": ceil["threads"]["1"],
        "ceiling_threads_encode_8": ceil["threads"][str(BUNDLED)],
        "ceiling_threads_generate_16": ceil["threads"]["16"],
        # every server measured / plain, at every encode load ("1", "8": 32 calls; "c1", "c2", "c4": 1 text):
        # the median of the rounds' ratios, the two measured within seconds of each other
        "over_plain": {
            name: {k: share(enc[name][k]["rounds"], enc["plain"][k]["rounds"]) for k in loads}
            for name in servers
            if name != "plain"
        },
    }
    return result


def load_name(key: str, concurrency: int) -> str:
    """'8' -> '8 texts/32 calls', 'c2' -> '1 text/2 calls', 'long' -> '1 long text/32 calls' (the keys of
    the encode loads)."""
    if key == LONG:
        return f"1 long text/{concurrency} calls"
    calls, texts = (int(key[1:]), 1) if key.startswith("c") else (concurrency, int(key))
    return f"{texts} text{'s' if texts > 1 else ''}/{calls} call{'s' if calls > 1 else ''}"


def ceiling(model_ms: float, grpc_ms: float, limit: float) -> float:
    """The share of ``limit`` one core reaches when a unit costs ``model_ms`` plus ``grpc_ms`` of CPU."""
    return min(1.0, 1e3 / (model_ms + grpc_ms) / limit)


def idle_minus_plain(paired: dict[str, Any]) -> list[float]:
    """Each idle round's attnserve p50 less the plain peer's."""
    return [a - p for a, p in zip(paired["idle_p50_ms"]["attnserve"], paired["idle_p50_ms"]["plain"], strict=True)]


def span(values: list[float], places: int, sign: str = "+") -> str:
    """'+0.13 to +1.33': the least and the most of the rounds' figures."""
    return f"{min(values):{sign}.{places}f} to {max(values):{sign}.{places}f}"


def signed(values: list[float], places: int, sign: str = "+") -> str:
    """'+0.210 / +0.198 / +0.231': each round's figure."""
    return " / ".join(f"{v:{sign}.{places}f}" for v in values)


def table(r: dict[str, Any]) -> str:
    lim, enc, gen, s, pr = r["limit"], r["encode"], r["generate"], r["summary"], r["paired"]
    g16 = lim["generation"]["16"]
    timed = {key: [t["per_second"] for chain in chains for t in chain] for key, chains in r["limit_chains"].items()}
    short = timed["1"] + timed[str(BUNDLED)] + [v for k in FEW for v in timed[f"c{k}"]]
    model_ms = [t["cpu_ms"] for chain in r["limit_chains"]["generate"] for t in chain]
    lines = [
        f"split: {r['machine']}",
        f"limit on the server's core (1 thread): encode {lim['encode_limit']:.0f} texts/s at batch "
        f"{lim['encode_best_batch']} (by batch: "
        + ", ".join(f"{b}: {v:.0f}" for b, v in lim["encode_texts_per_second_by_batch"].items())
        + f"), batch-1 {lim['encode_batch1_p50_ms']:.2f} ms",
        f"generation on the server's core, the streaming load run by the scheduler in process: the model takes "
        f"{g16['model_cpu_ms_per_token']:.3f} ms of CPU a token at 16 streams ({g16['prefill_share'] * 100:.0f}% of "
        f"it prefill; step p50 {g16['step_p50_ms']:.3f} ms, {lim['step_at_64_ms']['16']:.3f} ms with 64 tokens "
        f"cached), so 16 streams' limit is {lim['generate_limit_16']:.0f} tokens/s; one stream's step p50 "
        f"{lim['generation']['1']['step_p50_ms']:.3f} ms ({lim['step_at_64_ms']['1']:.3f} ms with 64 cached); "
        f"the scheduler alone, without gRPC, makes {g16['scheduler_tokens_per_second']:.0f} tokens/s "
        f"({g16['scheduler_tokens_per_second'] / lim['generate_limit_16'] * 100:.0f}%)",
        "the limit timed in process before and after every measurement (each share below is the median of the "
        f"rounds' shares, each against the mean of the two timings around it): {TOKENS}-token texts at batch "
        f"{lim['encode_best_batch']} {min(short):.0f}-{max(short):.0f} texts/s; {lim['long_tokens']}-token texts "
        f"{min(timed[LONG]):.0f}-{max(timed[LONG]):.0f}; 16 streams {min(timed['generate']):.0f}-"
        f"{max(timed['generate']):.0f} tokens/s (the model {min(model_ms):.3f}-{max(model_ms):.3f} ms of CPU a "
        f"token; the scheduler alone makes {s['scheduler_in_process_share'] * 100:.0f}% of it)",
        f"attnserve against the start's limit alone: {s['encode_1_share_of_start_limit'] * 100:.0f}% at 1 text a "
        f"request, {s['encode_8_share_of_start_limit'] * 100:.0f}% at {BUNDLED}",
        "",
        f"{'encode, 64-token texts, 32 concurrent':<44}{'texts/s':>9}{'share':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'srv CPU/text':>14}",
    ]
    for name in enc:
        for k in ("1", str(BUNDLED)):
            row = enc[name][k]
            label = f"{name}, {k} text{'s' if k != '1' else ''} a request"
            lines.append(
                f"{label:<44}{row['texts_per_second']:>9.0f}"
                f"{r['shares'][name][k] * 100:>7.0f}%"
                f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['server_cpu_ms_per_text']:>12.3f}ms"
            )
    ours = s["over_plain"]["attnserve"]
    lines.append(
        f"encode, {lim['long_tokens']}-token texts, 1 a request, {r['concurrency']} concurrent: limit "
        f"{lim['encode_long_limit']:.0f} texts/s (by batch: "
        + ", ".join(f"{b}: {v:.0f}" for b, v in lim["encode_long_by_batch"].items())
        + f"); attnserve {enc['attnserve'][LONG]['texts_per_second']:.0f} ({s['encode_long_share'] * 100:.0f}%), "
        f"plain {enc['plain'][LONG]['texts_per_second']:.0f} ({s['plain_long_share'] * 100:.0f}%): "
        f"{ours[LONG]:.2f}x"
    )
    if len(enc) > 2:  # the other designs ran too: each against the plain peer at every load
        keys = list(ours)
        lines.append(
            "/ plain at " + ", ".join(load_name(k, r["concurrency"]) for k in keys) + ": "
            + "; ".join(f"{n} " + " ".join(f"{v[k]:.2f}x" for k in keys) for n, v in s["over_plain"].items())
        )  # fmt: skip
    lines.append(
        "1 text a request, few concurrent: "
        + "; ".join(
            f"{c}: attnserve {enc['attnserve'][f'c{c}']['texts_per_second']:.0f}, plain "
            f"{enc['plain'][f'c{c}']['texts_per_second']:.0f} texts/s ({ours[f'c{c}']:.2f}x)"
            for c in FEW
        )
    )
    lines += [
        f"attnserve / plain: {ours['1']:.2f}x at 1 text a request, {ours[str(BUNDLED)]:.2f}x at "
        f"{BUNDLED}; idle p50 - batch-1 (median of {len(pr['batch1_p50_ms'])} paired rounds, the servers' order "
        f"rotated): attnserve {s['idle_p50_minus_batch1_ms']:+.2f} ms "
        f"({span(pr['idle_minus_batch1_ms']['attnserve'], 2)}), plain {s['plain_idle_p50_minus_batch1_ms']:+.2f} ms "
        f"({span(pr['idle_minus_batch1_ms']['plain'], 2)}); "
        f"batch-1 {span(pr['batch1_p50_ms'], 2, '')} ms; attnserve - plain {s['idle_minus_plain_ms']:+.2f} ms, "
        f"under it in {s['idle_under_plain_rounds']} of {len(pr['batch1_p50_ms'])} rounds",
        f"  of which gRPC's round trip with no model {s['floor_idle_p50_ms']:.2f} ms "
        f"({span(pr['floor_idle_p50_ms'], 2, '')}), the model's batch-1 at an idle server's pace "
        f"{s['batch1_paced_minus_batch1_ms']:+.2f} ms ({span(pr['batch1_paced_p50_ms'], 2, '')} ms); left, the "
        f"server's own: attnserve {s['idle_own_ms']:+.2f} ms ({span(pr['idle_own_ms']['attnserve'], 2)}), plain "
        f"{s['plain_idle_own_ms']:+.2f} ms ({span(pr['idle_own_ms']['plain'], 2)})",
        f"model CPU per text {lim['encode_cpu_ms_per_text']:.3f} ms; attnserve's own, 1 text a request: "
        f"{s['encode_server_overhead_ms_per_text']:.3f} ms",
        "",
        f"{'GenerateStream, 128 new tokens':<44}{'tokens/s':>9}{'share':>8}{'ITL p50':>9}{'ITL p99':>9}"
        f"{'tokens/msg':>11}{'gap p50':>9}",
    ]
    for key in r["shares"]["generate"]:
        name, _, load = key.rpartition("/")
        label = f"{name + ', ' if name else ''}16 streams, " + (
            f"--stream-interval {GROUPED}" if load == f"16x{GROUPED}" else "1 token a message"
        )
        row = gen[key]["load"]
        lines.append(
            f"{label:<44}{row['output_tokens_per_second']:>9.0f}"
            f"{r['shares']['generate'][key] * 100:>7.0f}%"
            f"{row['itl_p50_ms']:>9.3f}{row['itl_p99_ms']:>9.3f}"
            f"{row['tokens_per_message']:>11.2f}{row['gap_p50_ms']:>9.3f}"
        )
    one = gen["1"]
    lines.append(
        f"{'1 stream':<44}{one['output_tokens_per_second']:>9.0f}{'':>8}"
        f"{one['itl_p50_ms']:>9.3f}{one['itl_p99_ms']:>9.3f}"
        f"{one['tokens_per_message']:>11.2f}{one['gap_p50_ms']:>9.3f}"
    )
    lines.append(
        f"single-stream ITL p50 - batch-1 step (median of {len(pr['step_p50_ms'])} paired rounds): "
        f"{s['single_stream_itl_minus_step_ms']:+.3f} ms ({signed(pr['itl_minus_step_ms'], 3)}; steps "
        f"{signed(pr['step_p50_ms'], 3, '')} ms); "
        f"server CPU per token at 16 streams {s['generate_server_cpu_ms_per_token_16']:.3f} ms "
        f"(the model's: {s['generate_model_cpu_ms_per_token_16']:.3f} ms)"
    )
    lines.append(
        f"  of which gRPC's own, one stream with no model: {s['floor_itl_p50_ms']:.3f} ms "
        f"({signed(pr['floor_itl_p50_ms'], 3, '')}); left, the server's own: {s['itl_own_ms']:+.3f} ms "
        f"({signed(pr['itl_own_ms'], 3)})"
    )
    fl, ft = r["floor"], r["floor_threads"]
    lines += [
        "",
        "gRPC alone on the server's core (a server with no model): encode "
        f"{fl['encode_1']['load']['texts_per_second']:.0f} texts/s at 1 a request "
        f"({fl['encode_1']['server_cpu_ms']:.3f} ms CPU a text), "
        f"{fl[f'encode_{BUNDLED}']['load']['texts_per_second']:.0f} at {BUNDLED} "
        f"({fl[f'encode_{BUNDLED}']['server_cpu_ms']:.3f} ms); 16 streams "
        f"{fl['generate_16x1']['load']['output_tokens_per_second']:.0f} tokens/s at 1 a message "
        f"({fl['generate_16x1']['server_cpu_ms']:.3f} ms CPU a token), "
        f"{fl[f'generate_16x{GROUPED}']['load']['output_tokens_per_second']:.0f} at {GROUPED} "
        f"({fl[f'generate_16x{GROUPED}']['server_cpu_ms']:.3f} ms)",
        f"so one core allows at most: encode {s['ceiling_encode_1'] * 100:.0f}% of the limit at 1 text a request, "
        f"{s['ceiling_encode_8'] * 100:.0f}% at {BUNDLED}; 16 streams {s['ceiling_generate_16'] * 100:.0f}% at 1 token "
        f"a message, {s['ceiling_generate_16_grouped'] * 100:.0f}% at {GROUPED}",
        f"on grpc's thread-pool server ({FLOOR_THREADS} threads) gRPC alone costs "
        f"{ft['encode_1']['server_cpu_ms']:.3f} ms CPU a text at 1 a request, "
        f"{ft[f'encode_{BUNDLED}']['server_cpu_ms']:.3f} at {BUNDLED}, "
        f"{ft['generate_16x1']['server_cpu_ms']:.3f} a token at 16 streams: at most "
        f"{s['ceiling_threads_encode_1'] * 100:.0f}%, {s['ceiling_threads_encode_8'] * 100:.0f}% and "
        f"{s['ceiling_threads_generate_16'] * 100:.0f}%",
    ]
    for key, title in (("profile_encode", "encode, 1 text a request"), ("profile_generate", "16 streams")):
        if key not in r:
            continue
        prof = r[key]
        if "error" in prof:
            lines.append(f"profile ({title}): {prof['error']}")
            continue
        lines.append("")
        lines.append(f"where the server's CPU goes under {title} ({prof['samples']} samples; threads: "
                     + ", ".join(f"{n} {v * 100:.0f}%" for n, v in prof["threads"]) + ")")  # fmt: skip
        lines.append(f"  {'own time':<52}{'':>6}  {'inclusive':<52}")
        for (a, va), (b, vb) in zip(prof["own"], prof["inclusive"], strict=False):
            lines.append(f"  {a[:50]:<52}{va * 100:>5.1f}%  {b[:50]:<52}{vb * 100:>5.1f}%")
    return "\n".join(lines)
