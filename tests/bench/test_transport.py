"""The transport floor: a server with the real API and no model, loaded by the benchmarks' own clients."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from bench import encode, generate
from bench.transport import ceiling_share, cpu_per_unit, floor_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc


async def replies(address: str) -> tuple[pb.EncodeResponse, list[pb.GenerateStreamResponse]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        enc = await stub.Encode(pb.EncodeRequest(texts=["one", "two", "three"]))
        stream = [m async for m in stub.GenerateStream(pb.GenerateRequest(prompt="hi", max_new_tokens=10))]
    return enc, stream


@pytest.mark.parametrize("threads", [0, 8], ids=["grpc.aio", "thread-pool"])
def test_the_floor_server_answers_like_the_real_one(threads: int) -> None:
    with floor_server(dimensions=24, stream_interval=4, threads=threads) as (address, _):
        enc, stream = asyncio.run(replies(address))
    assert enc.dimensions == 24 and [len(e.values) for e in enc.embeddings] == [24, 24, 24]
    assert [len(m.tokens) for m in stream] == [4, 4, 2]  # four a message, the rest in the last
    assert stream[-1].finish_reason == pb.FINISH_REASON_LENGTH and stream[-1].usage.generated_tokens == 10
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in stream[:-1])


def test_cpu_per_unit_counts_both_sides_of_the_benchmarks_loads() -> None:
    texts = ["the king speaks " * 8] * 4
    with floor_server(dimensions=32) as (address, pid):
        enc = asyncio.run(cpu_per_unit(pid, encode.closed_loop(address, texts, 4, 0.5, 2), lambda r: r["texts"]))
    assert enc["load"]["texts_per_request"] == 2 and enc["units"] == 2 * enc["load"]["requests"] > 0
    assert enc["server_cpu_ms"] > 0 and enc["client_cpu_ms"] > 0
    assert enc["cpu_ms"] == pytest.approx(enc["server_cpu_ms"] + enc["client_cpu_ms"])
    with floor_server(dimensions=32, stream_interval=8) as (address, pid):
        gen = asyncio.run(cpu_per_unit(pid, generate.closed_loop(address, texts, 2, 0.5), lambda r: r["tokens"]))
    assert gen["units"] == generate.NEW_TOKENS * gen["load"]["requests"] > 0 and gen["cpu_ms"] > 0
    # eight tokens a message: the load says so, and a message's gap is its tokens' ITL eight times over
    load = gen["load"]
    assert load["tokens_per_message"] == 8.0
    assert load["gap_p50_ms"] == pytest.approx(8 * load["itl_p50_ms"])


def test_ceiling_share() -> None:
    cores = os.cpu_count() or 1
    # a unit costing 1 ms of model CPU alone reaches cores / 1 ms: the whole of that limit
    assert ceiling_share(cores * 1000.0, 1.0, 0.0) == pytest.approx(1.0)
    # the same with 0.25 ms of transport on top: 1 / 1.25 of it
    assert ceiling_share(cores * 1000.0, 1.0, 0.25) == pytest.approx(0.8)
    assert ceiling_share(1.0, 1.0, 0.0) == 1.0  # never above the limit
