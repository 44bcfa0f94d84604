"""The split benchmark's parts: the plain peer serves the same numbers, pinning holds, profiles parse."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from bench import split
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from tests.service.conftest import ServerThread, config

TEXTS = ["the king speaks", "a", "my lord, what news from the field"]


async def encode(address: str) -> pb.EncodeResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.AttnServeStub(channel).Encode(pb.EncodeRequest(texts=TEXTS))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_the_plain_peer_serves_what_attnserve_does_on_the_core_it_is_given(model_dir: Path) -> None:
    served = ServerThread(config(model_dir)).start()
    try:
        ours = served.stub().Encode(pb.EncodeRequest(texts=TEXTS))
    finally:
        served.stop()
    with split.pinned_server(split.plain_cmd(model_dir)) as (address, pid):
        assert os.sched_getaffinity(pid) == {split.SERVER_CORE}
        threads = os.listdir(f"/proc/{pid}/task")
        assert all(os.sched_getaffinity(int(t)) == {split.SERVER_CORE} for t in threads)
        peer = asyncio.run(encode(address))
    np.testing.assert_allclose(
        [e.values for e in peer.embeddings], [e.values for e in ours.embeddings], rtol=1e-5, atol=1e-5
    )
    assert [e.token_count for e in peer.embeddings] == [e.token_count for e in ours.embeddings]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_latencies_are_paired_with_the_models_own_time_round_by_round(model_dir: Path) -> None:
    from bench.generate import prompts_of

    prompts = prompts_of(split.runtime_on_core(model_dir), 4, hi=8)
    with (
        split.pinned_server(split.attnserve_cmd(model_dir)) as (ours, _),
        split.pinned_server(split.plain_cmd(model_dir)) as (plain, _),
        split.floor_server(32, 1, cpus={split.SERVER_CORE}) as (floor, _),
    ):
        servers = {"attnserve": ours, "plain": plain}
        p = split.paired_latency(model_dir, servers, TEXTS, prompts, 0.3, 3, floor=floor, idle_rounds=4)
    assert len(p["step_p50_ms"]) == len(p["itl_p50_ms"]) == len(p["floor_itl_p50_ms"]) == 3
    # the idle Encode has rounds of its own, with the model timed in each
    assert len(p["batch1_p50_ms"]) == len(p["batch1_paced_p50_ms"]) == len(p["floor_idle_p50_ms"]) == 4
    assert len(p["idle_p50_ms"]["attnserve"]) == len(p["idle_p50_ms"]["plain"]) == 4
    assert all(v > 0 for v in p["step_p50_ms"] + p["itl_p50_ms"] + p["batch1_p50_ms"] + p["batch1_paced_p50_ms"])
    assert all(v > 0 for v in p["floor_idle_p50_ms"] + p["floor_itl_p50_ms"])
    # taken apart within each round: gRPC's own share, the model at an idle pace, and the server's own
    assert p["itl_own_ms"] == [d - f for d, f in zip(p["itl_minus_step_ms"], p["floor_itl_p50_ms"], strict=True)]
    for name in ("attnserve", "plain"):
        parts = zip(p["idle_p50_ms"][name], p["batch1_paced_p50_ms"], p["floor_idle_p50_ms"], strict=True)
        assert p["idle_own_ms"][name] == [v - b - f for v, b, f in parts]
    # each difference is taken within its round
    assert p["itl_minus_step_ms"] == [i - s for i, s in zip(p["itl_p50_ms"], p["step_p50_ms"], strict=True)]
    for name in ("attnserve", "plain"):
        idle = p["idle_p50_ms"][name]
        assert p["idle_minus_batch1_ms"][name] == [v - b for v, b in zip(idle, p["batch1_p50_ms"], strict=True)]
    # the one stream reported is the round whose difference is the median
    median_round = p["itl_p50_ms"].index(p["one_stream"]["itl_p50_ms"])
    assert p["itl_minus_step_ms"][median_round] == sorted(p["itl_minus_step_ms"])[1]
    assert p["one_stream"]["tokens"] > 0


def test_each_server_takes_every_place_in_the_idle_rounds_order() -> None:
    names = ["attnserve", "plain", ""]
    orders = [split.rotated(names, r) for r in range(2 * len(names))]
    assert all(sorted(order) == sorted(names) for order in orders)
    for name in names:
        # first, middle and last, each twice over six rounds
        assert Counter(order.index(name) for order in orders) == {0: 2, 1: 2, 2: 2}
    # and not the same order twice
    assert len({tuple(order) for order in orders}) == len(orders)


def test_profile_summary_from_folded_stacks() -> None:
    folded = "\n".join(
        [
            'thread (0x1) "MainThread";run (a/runner.py:10);handle (service/servicer.py:120) 6',
            'thread (0x2) "batch-1";run (a/runner.py:10);encode (service/runtime.py:400) 3',
            'thread (0x2) "batch-1";encode (service/runtime.py:400) 1',
        ]
    )
    s = split.summarize(folded)
    assert s["samples"] == 10
    assert s["own"][0] == ("servicer.handle", 0.6)
    assert dict(s["inclusive"])["runner.run"] == pytest.approx(0.9)
    assert dict(s["inclusive"])["runtime.encode"] == pytest.approx(0.4)
    assert dict(s["threads"]) == {"MainThread": 0.6, "batch": 0.4}


def test_profile_summary_names_threads_as_py_spy_0_4_writes_them() -> None:
    folded = "\n".join(
        [
            "thread (8929): MainThread;run (a/runner.py:10);handle (service/servicer.py:120) 3",
            "thread (8939): attnserve-encode-0;encode (service/runtime.py:400) 2",
            "thread (8940): attnserve-encode-1;encode (service/runtime.py:400) 2",
            "thread (8941): attnserve-scheduler;step (service/scheduler.py:380) 1",
        ]
    )
    threads = dict(split.summarize(folded)["threads"])
    assert threads == {"MainThread": 0.375, "attnserve-encode": 0.5, "attnserve-scheduler": 0.125}


def test_ceiling_is_the_share_one_core_allows() -> None:
    # 1 ms of model and 0.25 ms of gRPC a unit: 800 a second on one core, against a limit of 1000
    assert split.ceiling(1.0, 0.25, 1000.0) == pytest.approx(0.8)
    assert split.ceiling(1.0, 0.0, 500.0) == 1.0


def test_generation_limit_is_the_models_own_time_on_the_streaming_load(model_dir: Path) -> None:
    from service.runtime import Runtime, RuntimeOptions

    rt = Runtime(model_dir, RuntimeOptions(device="cpu", intra_op_threads=1))
    prompts = ["the king", "my lord, what news", "a"]
    r = asyncio.run(split.generation_in_process(rt, prompts, 4, 0.5))
    assert r["tokens"] > 0
    # the model's time is part of the scheduler's, so the limit is above what the scheduler makes
    assert r["limit_tokens_per_second"] > r["scheduler_tokens_per_second"] > 0
    assert 0 < r["prefill_share"] < 1 and r["step_p50_ms"] > 0
    assert r["cpu_ms_per_token"] > r["model_cpu_ms_per_token"] > 0
    # the runtime is left as it was: its own methods, not the timed ones
    assert "decode_step" not in vars(rt) and "prefill" not in vars(rt)


def test_encode_loads_are_named_by_texts_and_calls() -> None:
    assert split.load_name("8", 32) == "8 texts/32 calls"
    assert split.load_name("1", 32) == "1 text/32 calls"
    assert split.load_name("c1", 32) == "1 text/1 call"
    assert split.load_name("c4", 32) == "1 text/4 calls"
    assert split.load_name(split.LONG, 32) == "1 long text/32 calls"


def test_paced_timing_leaves_out_the_pause_and_times_the_call() -> None:
    assert split.paced_median_seconds(lambda: None, 0.01, runs=5) < 0.005
    assert split.paced_median_seconds(lambda: time.sleep(0.02), 0.0, runs=3) >= 0.02


def test_a_share_is_the_median_of_each_rounds_rate_against_its_own_limit() -> None:
    # a round in a slow minute reads a low rate and a low limit alike: its share is as the others'
    rates, limits = [100.0, 50.0, 80.0], [200.0, 100.0, 100.0]
    assert split.share(rates, limits) == pytest.approx(0.5)
    # against one limit for every round the slow minute would read as the server's
    assert statistics.median(rates) / statistics.median(limits) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        split.share([1.0, 2.0], [1.0])


def test_each_measurement_is_taken_against_the_limit_timed_before_and_after_it() -> None:
    timings = iter([{"per_second": v, "cpu_ms": 1000 / v} for v in (100.0, 80.0, 120.0)])
    made: list[dict[str, Any]] = []
    order: list[str] = []

    def measure(tag: str) -> dict[str, Any]:
        order.append(tag)
        return {"tag": tag}

    chain = split.bracketed(lambda: next(timings), [(partial(measure, "a"), made), (partial(measure, "b"), made)])
    assert [t["per_second"] for t in chain] == [100.0, 80.0, 120.0]  # one before, one after each
    assert order == ["a", "b"] and [m["tag"] for m in made] == ["a", "b"]
    assert made[0]["limit"]["per_second"] == 90.0 and made[1]["limit"]["per_second"] == 100.0
    assert made[0]["limit"]["cpu_ms"] == pytest.approx((10.0 + 12.5) / 2)
    assert split.share_of_limit(
        [{"load": {"r": 45.0}, "limit": {"per_second": 90.0}}, {"load": {"r": 80.0}, "limit": {"per_second": 100.0}}],
        "r",
    ) == pytest.approx((0.5 + 0.8) / 2)


def test_the_middle_round_is_the_one_with_the_median_value() -> None:
    rounds = [{"v": 3.0}, {"v": 1.0}, {"v": 2.0}]
    assert split.middle(rounds, lambda r: r["v"]) == {"v": 2.0}
    assert split.middle(rounds[:2], lambda r: r["v"]) == {"v": 1.0}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
@pytest.mark.parametrize("designs", [False, True], ids=["servers", "with-designs"])
def test_a_whole_run_pairs_every_share_with_its_rounds_limit(model_dir: Path, designs: bool) -> None:
    before = os.sched_getaffinity(0)
    try:
        r = split.run(model_dir, seconds=0.2, rounds=2, concurrency=4, limit_seconds=0.1, designs=designs)
    finally:
        os.sched_setaffinity(0, before)
    loads = ("1", "8", "c1", "c2", "c4", split.LONG)
    assert set(r["limit_chains"]) == {*loads, "generate"}
    servers = 5 if designs else 2  # attnserve and the plain peer, with designs the bridge, threaded and grpclib ones
    streamers = 6 if designs else 2  # attnserve at 1 and 4 tokens a message, with designs the two streaming designs too
    # per round: a timing before the first measurement and one after each (the servers; two floors at 1 and 8)
    assert [len(c) for c in r["limit_chains"]["8"]] == [servers + 3] * 2
    assert [len(c) for c in r["limit_chains"]["c1"]] == [servers + 1] * 2
    assert [len(c) for c in r["limit_chains"]["generate"]] == [streamers + 4] * 2  # and three floor loads
    for name in ("attnserve", "plain"):
        for key in loads:
            rates = r["encode"][name][key]["rounds"]
            assert len(rates) == 2
            assert r["shares"][name][key] > 0
    # the share is against the limit timed around that very measurement
    first = r["limit_chains"]["1"][0]
    ours = r["encode"]["attnserve"]["1"]["rounds"][0] / ((first[0]["per_second"] + first[1]["per_second"]) / 2)
    again = r["encode"]["attnserve"]["1"]["rounds"][1]
    second = r["limit_chains"]["1"][1]
    assert r["shares"]["attnserve"]["1"] == pytest.approx(
        statistics.median([ours, again / ((second[0]["per_second"] + second[1]["per_second"]) / 2)])
    )
    assert 0 < r["summary"]["encode_8_share"] == r["shares"]["attnserve"]["8"]
    ours, plain = r["encode"]["attnserve"]["c1"]["rounds"], r["encode"]["plain"]["c1"]["rounds"]
    assert r["summary"]["over_plain"]["attnserve"]["c1"] == split.share(ours, plain)  # round by round
    assert 0 < r["summary"]["generate_16_share"] == r["shares"]["generate"]["16"]
    for key in ("ceiling_encode_1", "ceiling_encode_8", "ceiling_generate_16", "ceiling_threads_encode_1"):
        assert 0 < r["summary"][key] <= 1
    assert r["generate"]["16"]["load"]["output_tokens_per_second"] > 0
    assert r["generate"]["1"]["tokens"] > 0
    text = split.table(r)
    assert "before and after every measurement" in text and "16 streams, 1 token a message" in text
    for design in ("threaded", "grpclib"):
        streams = (r["summary"][f"{design}_generate_16_share"], r["summary"][f"{design}_generate_16_grouped_share"])
        if designs:
            assert all(x > 0 for x in streams) and streams[0] == r["shares"]["generate"][f"{design}/16"]
            assert f"{design}, 16 streams, 1 token a message" in text
            assert f"{design}, 16 streams, --stream-interval 4" in text
        else:
            assert streams == (None, None) and design not in text
