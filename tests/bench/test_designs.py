"""The designs measured beside attnserve answer what attnserve answers, errors included."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.designs import DESIGNS, STREAMING_DESIGNS
from bench.split import design_cmd
from bench.timing import running
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from tests.service.conftest import ServerThread, config

TEXTS = ["the king speaks", "a", "my lord, what news from the field"]
LONG = "my lord " * 400  # more tokens than the tiny model's context

REQUESTS = [
    pb.EncodeRequest(texts=TEXTS),
    pb.EncodeRequest(texts=TEXTS, pooling=pb.POOLING_LAST, normalize=True),
    pb.EncodeRequest(texts=[LONG, "a"], truncation=pb.TRUNCATION_END),
]
REFUSED = [pb.EncodeRequest(), pb.EncodeRequest(texts=["a", ""]), pb.EncodeRequest(texts=[LONG])]


def answers(stub: pb_grpc.AttnServeStub) -> tuple[list[pb.EncodeResponse], list[grpc.StatusCode]]:
    ok = [stub.Encode(r) for r in REQUESTS]
    codes = []
    for r in REFUSED:
        with pytest.raises(grpc.RpcError) as err:
            stub.Encode(r)
        codes.append(err.value.code())
    return ok, codes


@pytest.fixture(scope="module")
def attnserve_answers(model_dir: Path) -> tuple[list[pb.EncodeResponse], list[grpc.StatusCode]]:
    served = ServerThread(config(model_dir)).start()
    try:
        return answers(served.stub())
    finally:
        served.stop()


@pytest.mark.parametrize("design", DESIGNS)
def test_a_design_answers_as_attnserve_does(
    design: str, model_dir: Path, attnserve_answers: tuple[list[pb.EncodeResponse], list[grpc.StatusCode]]
) -> None:
    with running(design_cmd(model_dir, design)) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        ok, codes = answers(stub)
        # many calls at once, batched together, answer as one alone does
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda _: stub.Encode(REQUESTS[0]), range(48)))
    expected_ok, expected_codes = attnserve_answers
    assert codes == expected_codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(REFUSED)
    for got, want in zip(ok, expected_ok, strict=True):
        np.testing.assert_allclose(
            [e.values for e in got.embeddings], [e.values for e in want.embeddings], rtol=1e-5, atol=1e-5
        )
        assert [(e.token_count, e.truncated) for e in got.embeddings] == [
            (e.token_count, e.truncated) for e in want.embeddings
        ]
    assert ok[2].embeddings[0].truncated and not ok[2].embeddings[1].truncated
    for r in together:
        np.testing.assert_allclose(
            [e.values for e in r.embeddings], [e.values for e in ok[0].embeddings], rtol=1e-5, atol=1e-5
        )


GENERATIONS = [
    pb.GenerateRequest(prompt="the king", max_new_tokens=12, seed=7, temperature=0.8, top_k=20),
    pb.GenerateRequest(prompt="my lord", max_new_tokens=9, stop=["e"], logprobs=True, top_logprobs=2),
]
REFUSED_GENERATIONS = [
    pb.GenerateRequest(prompt=""),
    pb.GenerateRequest(prompt="a", temperature=-1.0),
    pb.GenerateRequest(prompt=LONG),
]


def streamed(stub: pb_grpc.AttnServeStub) -> tuple[list[list[pb.GenerateStreamResponse]], list[grpc.StatusCode]]:
    ok = [list(stub.GenerateStream(r)) for r in GENERATIONS]
    codes = []
    for r in REFUSED_GENERATIONS:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(r))
        codes.append(err.value.code())
    return ok, codes


@pytest.fixture(scope="module")
def attnserve_streams(model_dir: Path) -> tuple[list[list[pb.GenerateStreamResponse]], list[grpc.StatusCode]]:
    served = ServerThread(config(model_dir)).start()
    try:
        return streamed(served.stub())
    finally:
        served.stop()


@pytest.mark.parametrize("design", STREAMING_DESIGNS)
def test_a_design_streams_as_attnserve_does(
    design: str,
    model_dir: Path,
    attnserve_streams: tuple[list[list[pb.GenerateStreamResponse]], list[grpc.StatusCode]],
) -> None:
    expected_ok, expected_codes = attnserve_streams
    with running(design_cmd(model_dir, design)) as (address, _), grpc.insecure_channel(address) as channel:
        stub = pb_grpc.AttnServeStub(channel)
        ok, codes = streamed(stub)
        # a stream its client leaves frees its place: the next ones run to their end
        left = stub.GenerateStream(pb.GenerateRequest(prompt="the king", max_new_tokens=200))
        next(left)
        left.cancel()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda _: list(stub.GenerateStream(GENERATIONS[0])), range(16)))
    assert codes == expected_codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(REFUSED_GENERATIONS)
    for got, want in zip(ok, expected_ok, strict=True):
        assert "".join(m.text for m in got) == "".join(m.text for m in want)
        assert [t.token_id for m in got for t in m.tokens] == [t.token_id for m in want for t in m.tokens]
        assert (got[-1].finish_reason, got[-1].usage) == (want[-1].finish_reason, want[-1].usage)
    assert ok[1][-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert all(len(m.tokens[0].top_logprobs) == 2 for m in ok[1] if m.tokens)
    for messages in together:  # batched with others, each stream is what it is alone
        assert [t.token_id for m in messages for t in m.tokens] == [t.token_id for m in ok[0] for t in m.tokens]
