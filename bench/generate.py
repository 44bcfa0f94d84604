"""``attnserve bench generate``: streaming generation over real gRPC, as vLLM's serving benchmark reports it.

1. In process: the decode step time at batch 1 and at batch 16 with 128 cached tokens (the
   limit for 16 streams is 16 / step time), and cached decoding against re-running the whole
   sequence for every new token, for 128 new tokens.
2. A server process: closed loops of 1 and of 16 concurrent streams, and an open loop of
   Poisson arrivals; prompts of mixed length, 128 new tokens each. Requests/s, output tokens/s,
   time to first token and inter-token latency (p50, p99). Then 16 streams again against a server
   started with ``--stream-interval 4``: four tokens a message (the inter-token latency of a
   message's tokens is its gap over their count).
3. The transport floor (``bench.transport``): 16 streams against a server with no model, one and
   four tokens a message, and from it the ceiling these cores allow against the limit.

A benchmark, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np

from bench.encode import WORDS
from bench.timing import accelerator, device_flags, machine, server_process
from bench.transport import ceiling_share, cpu_per_unit, floor_server
from export.timing import median_seconds
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.runtime import Runtime, RuntimeOptions

NEW_TOKENS = 128
GROUPED = 4  # --stream-interval of the last load


def prompts_of(rt: Runtime, count: int, lo: int = 8, hi: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        want = rng.randint(lo, hi)
        words: list[str] = []
        while len(rt.tokenizer.encode(" ".join(words)).ids) < want:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def in_process(rt: Runtime, cached: int = 128, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    steps = {}
    for b in (1, 16):
        cache = rt.new_cache(b)
        one = np.ones((b, 1), np.int64)

        def step(cache: Any = cache, one: np.ndarray = one) -> None:
            cache.lengths[:] = cached
            rt.decode_step(cache, one, one)

        steps[b] = median_seconds(step, runs=200)
        if b == 16:
            cpu = time.process_time()
            for _ in range(200):
                step()
            step_cpu_ms = (time.process_time() - cpu) / 200 * 1e3  # all threads, spinning ones included

    def cached_decoding(prompt: list[int]) -> None:
        cache = rt.new_cache(1)
        logits, _ = rt.prefill(cache, [0], [prompt])
        for _ in range(new_tokens):
            nxt = np.array([[int(np.argmax(logits[-1]))]])
            logits = rt.decode_step(cache, nxt, np.ones((1, 1), np.int64))[:, 0]

    def recomputed(prompt: list[int]) -> None:
        ids = list(prompt)
        for _ in range(new_tokens):
            x = np.array([ids])
            logits, _ = rt.decode(x, np.ones_like(x))
            ids.append(int(np.argmax(logits[0, -1])))

    speedups = {}
    for n in (8, 32, 64):
        prompt = [int(t) for t in np.random.default_rng(n).integers(0, rt.info.vocab_size, n)]
        t_cached = median_seconds(functools.partial(cached_decoding, prompt), runs=3)
        t_full = median_seconds(functools.partial(recomputed, prompt), runs=3)
        speedups[str(n)] = {"cached_seconds": t_cached, "recomputed_seconds": t_full, "speedup": t_full / t_cached}
    return {
        "decode_step_ms": {str(b): s * 1e3 for b, s in steps.items()},
        "limit_tokens_per_second_16": 16 / steps[16],
        "cpu_ms_per_token_16": step_cpu_ms / 16,
        "cache_by_prompt_tokens": speedups,
    }


def _latencies() -> dict[str, list[float]]:
    """What ``_stream`` records, per stream or message: time to first token, ITL, gaps, message sizes."""
    return {"ttft": [], "itl": [], "gap": [], "sizes": []}


async def _stream(stub: pb_grpc.AttnServeStub, prompt: str, seed: int, out: dict[str, list[float]]) -> int:
    start = time.perf_counter()
    last = None
    n = 0
    req = pb.GenerateRequest(prompt=prompt, max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=40, seed=seed)
    async for msg in stub.GenerateStream(req):
        if not msg.tokens:
            continue
        now = time.perf_counter()
        if last is None:
            out["ttft"].append(now - start)
        else:
            out["itl"].append((now - last) / len(msg.tokens))
            out["gap"].append(now - last)  # between messages, however many tokens they carry
        last = now
        n += len(msg.tokens)
        out["sizes"].append(len(msg.tokens))
    return n


def _summary(lat: dict[str, list[float]], tokens: int, requests: int, elapsed: float) -> dict[str, Any]:
    def pct(xs: list[float], q: int) -> float:
        return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")

    return {
        "requests": requests,
        "tokens": tokens,
        "requests_per_second": requests / elapsed,
        "output_tokens_per_second": tokens / elapsed,
        "ttft_p50_ms": pct(lat["ttft"], 50),
        "ttft_p99_ms": pct(lat["ttft"], 99),
        "itl_p50_ms": pct(lat["itl"], 50),
        "itl_p99_ms": pct(lat["itl"], 99),
        # a server that falls behind its own steps sends several tokens a message even at one a message;
        # ITL above divides a message's gap among its tokens, so it reads best next to these
        "tokens_per_message": sum(lat["sizes"]) / len(lat["sizes"]) if lat["sizes"] else float("nan"),
        "gap_p50_ms": pct(lat["gap"], 50),
    }


async def closed_loop(address: str, prompts: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        await _stream(stub, prompts[0], 0, _latencies())
        lat = _latencies()
        counts = [0, 0]  # tokens, requests
        stop_at = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                n = await _stream(stub, prompts[k % len(prompts)], k, lat)  # never `+= await`: lost updates
                counts[0] += n
                counts[1] += 1
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        result = _summary(lat, counts[0], counts[1], time.perf_counter() - start)
    return {"concurrency": concurrency, **result}


async def open_loop(address: str, prompts: list[str], rate: float, seconds: float) -> dict[str, Any]:
    rng = random.Random(1)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        lat = _latencies()
        tasks = []
        start = next_at = time.perf_counter()
        k = 0
        while next_at - start < seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(_stream(stub, prompts[k % len(prompts)], k, lat)))
            k += 1
            next_at += rng.expovariate(rate)
        tokens = sum(await asyncio.gather(*tasks))
        result = _summary(lat, tokens, len(tasks), time.perf_counter() - start)
    return {"rate": rate, **result}


def run(
    model_dir: Path,
    seconds: float = 15.0,
    device: Literal["cpu", "cuda"] = "cpu",
    variant: Literal["fp32", "fp16"] = "fp32",
) -> dict[str, Any]:
    rt = Runtime(model_dir, RuntimeOptions(device=device, require_cuda=device == "cuda", variant=variant))
    prompts = prompts_of(rt, 64, hi=min(64, rt.info.max_seq_len - NEW_TOKENS - 1))
    result: dict[str, Any] = {
        "model": str(model_dir),
        "machine": machine(),
        "device": accelerator(device),
        "variant": variant,
        "new_tokens": NEW_TOKENS,
        "in_process": in_process(rt),
    }
    dimensions = rt.info.d_model
    del rt
    on_device = device_flags(device, variant)
    with server_process(model_dir, *on_device) as address:
        one = asyncio.run(closed_loop(address, prompts, 1, seconds))
        sixteen = asyncio.run(closed_loop(address, prompts, 16, seconds))
        rate = 0.7 * sixteen["requests_per_second"]
        opened = asyncio.run(open_loop(address, prompts, rate, seconds))
    with server_process(model_dir, *on_device, "--stream-interval", str(GROUPED)) as address:  # fewer, fuller messages
        grouped = asyncio.run(closed_loop(address, prompts, 16, seconds))
    with server_process(model_dir, *on_device, "--max-running-sequences", "1") as address:  # batching off
        unbatched = asyncio.run(closed_loop(address, prompts, 16, seconds))
    result["server"] = {
        "closed_1": one,
        "closed_16": sixteen,
        "open": opened,
        "closed_16_grouped": grouped,
        "closed_16_batching_off": unbatched,
    }
    result["transport"] = {}
    for interval in (1, GROUPED):
        with floor_server(dimensions, interval) as (address, pid):
            load = closed_loop(address, prompts, 16, min(5.0, seconds))
            result["transport"][str(interval)] = asyncio.run(cpu_per_unit(pid, load, lambda r: r["tokens"]))
    limit, model_ms = result["in_process"]["limit_tokens_per_second_16"], result["in_process"]["cpu_ms_per_token_16"]
    result["summary"] = {
        "streams16_over_one": sixteen["output_tokens_per_second"] / one["output_tokens_per_second"],
        "batching_gain": sixteen["output_tokens_per_second"] / unbatched["output_tokens_per_second"],
        "streams16_share_of_limit": sixteen["output_tokens_per_second"]
        / result["in_process"]["limit_tokens_per_second_16"],
        "streams16_grouped_share_of_limit": grouped["output_tokens_per_second"]
        / result["in_process"]["limit_tokens_per_second_16"],
        "streams16_ceiling_share_of_limit": ceiling_share(limit, model_ms, result["transport"]["1"]["cpu_ms"]),
        "streams16_grouped_ceiling_share_of_limit": ceiling_share(
            limit, model_ms, result["transport"][str(GROUPED)]["cpu_ms"]
        ),
        "cache_speedup_by_prompt_tokens": {
            k: v["speedup"] for k, v in result["in_process"]["cache_by_prompt_tokens"].items()
        },
    }
    return result


def table(r: dict[str, Any]) -> str:
    ip = r["in_process"]
    lines = [
        f"generate, {r['new_tokens']} new tokens, prompts of 8-64 tokens, {r['machine']}; "
        f"model on {r['device']} ({r['variant']})",
        f"in process: decode step {ip['decode_step_ms']['1']:.3f} ms at batch 1, {ip['decode_step_ms']['16']:.3f} ms "
        f"at batch 16 (limit {ip['limit_tokens_per_second_16']:.0f} tokens/s)",
        "128 new tokens, cached vs recomputed for every token: "
        + ", ".join(
            f"prompt {n}: {v['cached_seconds'] * 1e3:.0f} vs {v['recomputed_seconds'] * 1e3:.0f} ms "
            f"({v['speedup']:.1f}x)"
            for n, v in ip["cache_by_prompt_tokens"].items()
        ),
        f"{'load':<30}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}",
    ]
    s = r["server"]
    rows = [
        ("closed, 1 stream", s["closed_1"]),
        ("closed, 16 streams", s["closed_16"]),
        (f"open, Poisson {s['open']['rate']:.1f}/s", s["open"]),
        (f"closed, 16 streams, {GROUPED} a message", s["closed_16_grouped"]),
        ("closed, 16 streams, batching off", s["closed_16_batching_off"]),
    ]
    for name, row in rows:
        lines.append(
            f"{name:<30}{row['requests_per_second']:>8.2f}{row['output_tokens_per_second']:>9.0f}"
            f"{row['ttft_p50_ms']:>10.1f}{row['ttft_p99_ms']:>10.1f}{row['itl_p50_ms']:>9.2f}{row['itl_p99_ms']:>9.2f}"
        )
    m = r["summary"]
    lines.append(
        f"16 streams / 1 stream: {m['streams16_over_one']:.1f}x; batching gain: {m['batching_gain']:.1f}x; "
        f"16 streams / limit: "
        f"{m['streams16_share_of_limit'] * 100:.0f}% ({m['streams16_grouped_share_of_limit'] * 100:.0f}% with "
        f"{GROUPED} tokens a message)"
    )
    t1, tg = r["transport"]["1"], r["transport"][str(GROUPED)]
    lines.append(
        f"gRPC alone (no model), CPU a token, server + load generator: {t1['cpu_ms']:.3f} ms at one token a message, "
        f"{tg['cpu_ms']:.3f} ms at {GROUPED}; model {ip['cpu_ms_per_token_16']:.3f} ms at batch 16"
    )
    lines.append(
        f"ceiling on these cores: {m['streams16_ceiling_share_of_limit'] * 100:.0f}% of the limit at one token a "
        f"message, {m['streams16_grouped_ceiling_share_of_limit'] * 100:.0f}% at {GROUPED}"
    )
    return "\n".join(lines)
