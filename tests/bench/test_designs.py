"""The Encode designs measured beside attnserve answer what attnserve answers, errors included."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.designs import DESIGNS
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
