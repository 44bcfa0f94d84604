"""A server whose model runs on CUDA answers every RPC as one on the CPU does (run where a GPU is usable)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.batcher import CUDA_BATCH_TOKENS
from service.client import decode_probabilities
from tests.service.conftest import ServerThread, config, wait_for
from tests.service.test_server import TEXTS, metrics

pytestmark = pytest.mark.gpu
PROMPTS = ["The king speaks of", "Good sir", "My lord laughs at the", "a"]


@pytest.fixture(scope="module")
def on_cpu(model_dir: Path) -> Iterator[ServerThread]:
    st = ServerThread(config(model_dir)).start()
    yield st
    st.stop()


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def on_cuda(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[ServerThread, str]]:
    st = ServerThread(config(model_dir, device="cuda", require_cuda=True, variant=request.param)).start()
    yield st, request.param
    st.stop()


def tolerance(variant: str) -> float:
    return 1e-4 if variant == "fp32" else 2e-2


def test_the_model_runs_on_cuda_and_says_so(on_cuda: tuple[ServerThread, str]) -> None:
    st, _ = on_cuda
    info = st.stub().GetModelInfo(pb.GetModelInfoRequest())
    assert info.execution_provider == "CUDAExecutionProvider"
    assert info.limits.max_batch_tokens == CUDA_BATCH_TOKENS  # the default, chosen for the device
    m = metrics(st)
    assert m[("attnserve_execution_provider", (("provider", "CUDAExecutionProvider"),))] == 1


def test_encode_on_cuda_equals_encode_on_the_cpu(on_cpu: ServerThread, on_cuda: tuple[ServerThread, str]) -> None:
    st, variant = on_cuda
    want = on_cpu.stub().Encode(pb.EncodeRequest(texts=TEXTS))
    got = st.stub().Encode(pb.EncodeRequest(texts=TEXTS))
    for g, w in zip(got.embeddings, want.embeddings, strict=True):
        np.testing.assert_allclose(g.values, w.values, atol=tolerance(variant))
        assert g.token_count == w.token_count


def test_attention_maps_on_cuda_equal_those_on_the_cpu(on_cpu: ServerThread, on_cuda: tuple[ServerThread, str]) -> None:
    st, variant = on_cuda
    for text in TEXTS:
        want = decode_probabilities(on_cpu.stub().AttentionMap(pb.AttentionMapRequest(text=text)))
        got = decode_probabilities(st.stub().AttentionMap(pb.AttentionMapRequest(text=text)))
        np.testing.assert_allclose(got, want, atol=tolerance(variant))


def test_greedy_generation_on_cuda_picks_the_cpus_tokens(
    on_cpu: ServerThread, on_cuda: tuple[ServerThread, str]
) -> None:
    """fp32 on CUDA picks the same tokens as the CPU; fp16 may part where two logits lie closer than its
    rounding, so its first tokens are held and its log-probabilities only near the CPU's."""
    st, variant = on_cuda
    for prompt in PROMPTS:
        req = pb.GenerateRequest(prompt=prompt, max_new_tokens=24, temperature=0.0, logprobs=True)
        want, got = on_cpu.stub().Generate(req), st.stub().Generate(req)
        w, g = [t.token_id for t in want.tokens], [t.token_id for t in got.tokens]
        same = len(w) if variant == "fp32" else 4
        assert g[:same] == w[:same]
        g_lp, w_lp = ([t.logprob for t in r.tokens[:same]] for r in (got, want))
        np.testing.assert_allclose(g_lp, w_lp, atol=10 * tolerance(variant))


def test_concurrent_streams_on_cuda_each_get_their_own_tokens(
    on_cpu: ServerThread, on_cuda: tuple[ServerThread, str]
) -> None:
    """Sixteen streams at once share the device's cache: each gets what it gets alone on the CPU."""
    st, variant = on_cuda
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]

    async def stream(address: str, prompt: str) -> list[int]:
        async with grpc.aio.insecure_channel(address) as channel:
            req = pb.GenerateRequest(prompt=prompt, max_new_tokens=16, temperature=0.0)
            return [t.token_id async for r in pb_grpc.AttnServeStub(channel).GenerateStream(req) for t in r.tokens]

    async def all_of(address: str) -> list[list[int]]:
        return await asyncio.gather(*(stream(address, p) for p in prompts))

    want, got = asyncio.run(all_of(on_cpu.address)), asyncio.run(all_of(st.address))
    if variant == "fp32":
        assert got == want
    else:  # fp16 may take the other of two near-equal logits; a stream given another's tokens would miss most
        agree = [g == w for gs, ws in zip(got, want, strict=True) for g, w in zip(gs[:4], ws[:4], strict=True)]
        assert sum(agree) >= 0.9 * len(agree), (got, want)


def test_a_new_model_on_cuda_serves_while_the_one_before_ends_its_streams(on_cpu: ServerThread, tmp_path: Path) -> None:
    """Two models' sessions and caches on the device at once, then the first's let go."""
    from bench.reliability import point
    from tests.service.test_reload import copy

    link, two = tmp_path / "current", copy(on_cpu.server.config.model_dir, tmp_path / "v2", "2")
    point(link, copy(on_cpu.server.config.model_dir, tmp_path / "v1", "1"))
    st = ServerThread(config(link, device="cuda", require_cuda=True)).start()
    try:
        req = pb.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=24, temperature=0.0)
        want = [t.token_id for t in on_cpu.stub().Generate(req).tokens]
        stream = st.stub().GenerateStream(req, timeout=60)
        head = next(stream)
        old = st.server.servicer.loaded
        point(link, two)
        st.call(st.server.reload_model(asked=True))
        info = st.stub().GetModelInfo(pb.GetModelInfoRequest())
        assert (info.version, info.execution_provider) == ("2", "CUDAExecutionProvider")
        assert [t.token_id for m in (head, *stream) for t in m.tokens] == want  # ended on the model it began on
        assert [t.token_id for t in st.stub().Generate(req).tokens] == want
        assert old is not None and old.retired
        assert wait_for(lambda: not old.scheduler._thread.is_alive())  # type: ignore[union-attr]
    finally:
        st.stop()
