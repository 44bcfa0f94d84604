"""Generate and GenerateStream over real gRPC: against PyTorch, seeds, joins and leaves, stops, cancels."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from model.train import load_checkpoint
from protos.attnserve.v1 import attnserve_pb2 as pb
from tests.service.conftest import ServerThread, config, outcome, wait_for
from tests.service.test_server import metrics, reason

PROMPTS = ["The king", "Good sir waits for", "A fool laughs at the moon,\nThe night", "My"]


def gen(stub, prompt: str, **kw) -> pb.GenerateResponse:  # type: ignore[no-untyped-def]
    kw.setdefault("max_new_tokens", 24)
    return stub.Generate(pb.GenerateRequest(prompt=prompt, **kw), timeout=60)


def ids_of(r: pb.GenerateResponse) -> list[int]:
    return [t.token_id for t in r.tokens]


@contextlib.contextmanager
def slowed(model_dir: Path, **kw: object) -> Iterator[ServerThread]:
    """A server whose decode steps take 20 ms, so that a stream is still running when the test acts."""
    st = ServerThread(config(model_dir, **kw)).start()
    try:
        assert st.server.scheduler is not None
        rt = st.server.scheduler.runtime
        real = rt.decode_step

        def slow_step(*a, **kw):  # type: ignore[no-untyped-def]
            time.sleep(0.02)
            return real(*a, **kw)

        rt.decode_step = slow_step  # type: ignore[method-assign]
        yield st
    finally:
        st.stop()


@pytest.fixture
def slow(model_dir: Path) -> Iterator[ServerThread]:
    with slowed(model_dir, max_running_sequences=1, max_waiting_sequences=1) as st:
        yield st


def test_greedy_equals_pytorch_greedy_token_for_token(served: ServerThread, tiny_checkpoint: Path) -> None:
    model, _, _ = load_checkpoint(tiny_checkpoint / "checkpoint.pt")
    tok = served.server.scheduler.runtime.tokenizer  # type: ignore[union-attr]
    for prompt in PROMPTS:
        r = gen(served.stub(), prompt, temperature=0, max_new_tokens=30)
        prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
        ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=30, temperature=0)[0, len(prompt_ids) :]
        got = ids_of(r)
        assert got == ref.tolist()[: len(got)], prompt
        if r.finish_reason == pb.FINISH_REASON_END_OF_TEXT:
            assert ref[len(got)] == served.server.scheduler.eot  # type: ignore[union-attr]
        else:
            assert r.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_CONTEXT_FULL)
        assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.generated_tokens == len(got)


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_busy_batch(served: ServerThread) -> None:
    stub = served.stub()
    alone = gen(stub, "The king", temperature=1.0, top_k=20, seed=7)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(gen, stub, p, temperature=1.2, seed=i) for i, p in enumerate(PROMPTS * 2)]
        busy = pool.submit(gen, stub, "The king", temperature=1.0, top_k=20, seed=7)
        assert all(o.result().tokens for o in others)
    assert busy.result().text == alone.text and ids_of(busy.result()) == ids_of(alone)
    different = gen(stub, "The king", temperature=1.0, top_k=20, seed=8)
    assert ids_of(different) != ids_of(alone)


def test_sequences_join_and_leave_without_changing_each_other(served: ServerThread) -> None:
    stub = served.stub()
    lengths = [5, 30, 12, 20]
    alone = [gen(stub, p, temperature=0, max_new_tokens=n) for p, n in zip(PROMPTS, lengths, strict=True)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = []
        for p, n in zip(PROMPTS, lengths, strict=True):
            futures.append(pool.submit(gen, stub, p, temperature=0, max_new_tokens=n))
            time.sleep(0.003)  # staggered: each joins a batch already running
        for a, f in zip(alone, futures, strict=True):
            assert ids_of(f.result()) == ids_of(a)


def test_stop_sequences_stop_at_the_right_place(served: ServerThread) -> None:
    stub = served.stub()
    full = gen(stub, "The king", temperature=0, max_new_tokens=30).text
    stop = full[6:9]  # three characters from the middle of the continuation
    cut = gen(stub, "The king", temperature=0, max_new_tokens=30, stop=[stop, "never appears"])
    assert cut.finish_reason == pb.FINISH_REASON_STOP
    assert cut.text == full[: full.find(stop)]
    streamed = "".join(
        m.text
        for m in stub.GenerateStream(
            pb.GenerateRequest(prompt="The king", temperature=0, max_new_tokens=30, stop=[stop])
        )
    )
    assert streamed == cut.text


def test_streamed_tokens_concatenate_to_the_unary_result(served: ServerThread) -> None:
    stub = served.stub()
    unary = gen(stub, "Good sir", temperature=0.9, seed=3, max_new_tokens=40, logprobs=True, top_logprobs=3)
    messages = list(
        stub.GenerateStream(
            pb.GenerateRequest(
                prompt="Good sir", temperature=0.9, seed=3, max_new_tokens=40, logprobs=True, top_logprobs=3
            )
        )
    )
    assert "".join(m.text for m in messages) == unary.text
    assert [t.token_id for m in messages for t in m.tokens] == ids_of(unary)
    last = messages[-1]
    assert last.finish_reason == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert last.usage.generated_tokens == unary.usage.generated_tokens
    for t in unary.tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-6


def test_the_text_is_the_tokens_decoded_even_where_they_split_characters(served: ServerThread) -> None:
    """Text is decoded a token at a time from a table, and again from the tokenizer where a token
    ends inside a character: it reads as the whole sequence of tokens decoded at once."""
    tok = served.server.scheduler.runtime.tokenizer  # type: ignore[union-attr]
    stub = served.stub()
    split = 0
    for seed in range(12):
        # a flat distribution draws byte tokens that are parts of characters
        r = gen(stub, "The king", temperature=4.0, seed=seed, max_new_tokens=48)
        ids = ids_of(r)
        assert r.text == tok.decode(ids, skip_special_tokens=False)
        split += sum("\ufffd" in tok.decode([i], skip_special_tokens=False) for i in ids)
    assert split  # the case this test is for did occur


def test_a_stream_interval_gathers_tokens_into_fewer_messages(model_dir: Path) -> None:
    st = ServerThread(config(model_dir, stream_interval=4)).start()
    try:
        stub = st.stub()
        req = pb.GenerateRequest(prompt="Good sir", temperature=0.9, seed=5, max_new_tokens=30)
        messages = list(stub.GenerateStream(req))
        unary = stub.Generate(req)
        counts = [len(m.tokens) for m in messages]
        # 4 tokens a message (a multiple of 4 where the client lagged), what is left in the last
        assert all(c and c % 4 == 0 for c in counts[:-1])
        assert sum(counts) == unary.usage.generated_tokens > 8
        assert len(messages) <= -(-sum(counts) // 4) + 1  # the finish may come in a message of its own
        assert "".join(m.text for m in messages) == unary.text
        assert [t.token_id for m in messages for t in m.tokens] == ids_of(unary)
        assert messages[-1].finish_reason == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    finally:
        st.stop()


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10_000}, "max_new_tokens"),
        ({"repetition_penalty": -2.0}, "repetition_penalty"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "the king speaks " * 40}, "context"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_parameters_get_invalid_argument(served: ServerThread, kw: dict[str, object], needle: str) -> None:
    request = {"prompt": "The king", "max_new_tokens": 8} | kw
    for call in (served.stub().Generate, lambda r: list(served.stub().GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GenerateRequest(**request))  # type: ignore[arg-type]
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()


def test_cancelling_a_stream_frees_its_slot(slow: ServerThread) -> None:
    stub = slow.stub()
    before = metrics(slow)
    stream = stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=50, temperature=0))
    next(stream)
    assert metrics(slow)[("attnserve_generate_running_sequences", ())] == 1
    stream.cancel()
    deadline = time.monotonic() + 5
    while metrics(slow)[("attnserve_generate_running_sequences", ())] != 0:
        assert time.monotonic() < deadline, "the cancelled sequence kept its slot"
        time.sleep(0.02)
    after = metrics(slow)
    key = ("attnserve_generate_finished_total", (("reason", "cancelled"),))
    assert after[key] == before.get(key, 0) + 1
    assert gen(stub, "Next", max_new_tokens=3).usage.generated_tokens == 3  # the slot serves again


def test_a_full_waiting_queue_is_refused_at_once(slow: ServerThread) -> None:
    stub = slow.stub()
    running = stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=40, temperature=0))
    next(running)  # holds the only slot
    waiting = stub.Generate.future(pb.GenerateRequest(prompt="Good sir", max_new_tokens=2))
    time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as e:
        gen(stub, "One too many", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and reason(e.value) == "QUEUE_FULL"
    running.cancel()
    assert waiting.result(30).usage.generated_tokens == 2


def test_a_call_that_could_not_be_done_before_its_deadline_is_refused_at_once(model_dir: Path) -> None:
    """Under load a call waits for a slot; one whose wait and run, as the server has seen sequences
    go, would outlast its deadline is refused at once (RESOURCE_EXHAUSTED, to retry elsewhere),
    rather than queued to expire: under a 3x overload with 0.3 s deadlines, 5% of the server's
    capacity had still come back OK."""
    with slowed(model_dir, max_running_sequences=1, max_waiting_sequences=4) as st:
        stub = st.stub()
        learned = gen(stub, "The king", max_new_tokens=8, temperature=0)  # how long sequences take, learned
        assert learned.usage.generated_tokens >= 1
        # a slot free and nothing waiting: let in whatever its deadline, as on an idle server
        request = pb.GenerateRequest(prompt="Good sir", max_new_tokens=8, temperature=0)
        try:
            stub.Generate(request, timeout=0.05)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running = stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=200, temperature=0))
        next(running)  # holds the only slot
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request, timeout=0.1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        assert "deadline" in e.value.details() and reason(e.value) == "QUEUE_TOO_LONG"
        assert time.monotonic() - start < 0.09  # at once, not when the deadline passed
        waiting = stub.Generate.future(request, timeout=60)  # time enough: queued behind the stream
        time.sleep(0.1)
        running.cancel()
        assert waiting.result(60).usage.generated_tokens >= 1


def test_a_free_slot_goes_to_the_highest_priority_waiting_first_come_first_served_within_it(model_dir: Path) -> None:
    with slowed(model_dir, max_running_sequences=1, max_waiting_sequences=8) as st:
        stub = st.stub()
        running = stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=200, temperature=0))
        next(running)  # holds the only slot
        finished: list[str] = []
        calls = []
        order = [
            ("low", pb.PRIORITY_LOW),
            ("normal", pb.PRIORITY_UNSPECIFIED),
            ("high 1", pb.PRIORITY_HIGH),
            ("normal 2", pb.PRIORITY_NORMAL),
            ("high 2", pb.PRIORITY_HIGH),
        ]
        for name, priority in order:
            request = pb.GenerateRequest(prompt="Good sir", max_new_tokens=2, temperature=0, priority=priority)
            call = stub.Generate.future(request, timeout=60)
            call.add_done_callback(lambda _, name=name: finished.append(name))  # type: ignore[misc]
            calls.append(call)
            wait_for(lambda: metrics(st)[("attnserve_generate_waiting_sequences", ())] == len(calls))
        before = metrics(st)
        running.cancel()
        assert [c.result(60).usage.generated_tokens for c in calls] == [2] * 5
        assert finished == ["high 1", "high 2", "normal", "normal 2", "low"]
        after = metrics(st)
        for level, n in (("high", 2), ("normal", 2), ("low", 1)):
            key = ("attnserve_generate_queue_duration_seconds_count", (("priority", level),))
            assert after[key] == before.get(key, 0) + n, level


def test_at_a_full_queue_a_generation_takes_the_place_of_the_lower_one_that_came_last(model_dir: Path) -> None:
    with slowed(model_dir, max_running_sequences=1, max_waiting_sequences=2) as st:
        stub = st.stub()
        running = stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=200, temperature=0))
        next(running)  # holds the only slot

        def waiting(priority: int) -> grpc.Future:
            request = pb.GenerateRequest(prompt="Good sir", max_new_tokens=2, temperature=0, priority=priority)
            return stub.Generate.future(request, timeout=60)

        low = waiting(pb.PRIORITY_LOW)
        wait_for(lambda: metrics(st)[("attnserve_generate_waiting_sequences", ())] == 1)
        later_low = waiting(pb.PRIORITY_LOW)
        wait_for(lambda: metrics(st)[("attnserve_generate_waiting_sequences", ())] == 2)
        high = waiting(pb.PRIORITY_HIGH)  # full: the later low gives its place
        code, details = outcome(later_low)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "displaced by work of a higher priority" in details
        assert reason(later_low.exception()) == "QUEUE_FULL"  # type: ignore[arg-type]
        normal = waiting(pb.PRIORITY_NORMAL)  # and the other low, for normal work
        assert "displaced" in outcome(low)[1]
        with pytest.raises(grpc.RpcError) as e:  # nothing lower than normal waits: refused, as before
            gen(stub, "One too many", max_new_tokens=2, priority=pb.PRIORITY_NORMAL)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "displaced" not in (e.value.details() or "")
        running.cancel()
        assert high.result(60).usage.generated_tokens == normal.result(60).usage.generated_tokens == 2


def test_a_burst_at_an_idle_server_is_not_taken_for_a_queue(model_dir: Path) -> None:
    """Calls that arrive together wait, for a moment, for the loop to let them into the free slots:
    none is refused for its deadline while there are slots for all of them."""
    with slowed(model_dir, max_running_sequences=8) as st:
        stub = st.stub()
        request = pb.GenerateRequest(prompt="The king", max_new_tokens=8, temperature=0)
        start = time.monotonic()
        stub.Generate(request, timeout=30)  # how long a sequence runs, learned
        alone = time.monotonic() - start
        # time for each to run, but not for the others' runs too, were they ahead of it in a queue
        burst = [stub.Generate.future(request, timeout=3 * alone) for _ in range(8)]
        codes = [outcome(call)[0] for call in burst]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED not in codes, codes


def test_generation_metrics_move(served: ServerThread) -> None:
    before = metrics(served)
    gen(served.stub(), "The king", max_new_tokens=5, temperature=0)
    after = metrics(served)
    for name, labels in (
        ("attnserve_generate_time_to_first_token_seconds_count", ()),
        ("attnserve_generate_duration_seconds_count", ()),
        ("attnserve_generate_queue_duration_seconds_count", (("priority", "normal"),)),
    ):
        assert after[(name, labels)] == before.get((name, labels), 0) + 1, name
    assert (
        after[("attnserve_generate_generated_tokens_total", ())]
        >= before.get(("attnserve_generate_generated_tokens_total", ()), 0) + 5
    )
    assert after[("attnserve_generate_inter_token_latency_seconds_count", ())] > 0
    assert after[("attnserve_generate_decode_batch_size_count", ())] > 0
    assert np.isfinite(after[("attnserve_generate_prompt_tokens_total", ())])


def test_tokens_say_what_they_attended_to(served: ServerThread) -> None:
    """Each token's top positions equal the attention map's row for the step that chose it."""
    from service.client import decode_probabilities

    stub = served.stub()
    tok = served.server.scheduler.runtime.tokenizer  # type: ignore[union-attr]
    prompt = "The king speaks of"
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    r = gen(stub, prompt, temperature=0, max_new_tokens=6, return_attention=True, attention_top_k=3)
    assert r.tokens
    generated = [t.token_id for t in r.tokens]
    for i, t in enumerate(r.tokens):
        ids = prompt_ids + generated[:i]  # what the model had read when it chose token i
        amap = decode_probabilities(stub.AttentionMap(pb.AttentionMapRequest(token_ids=pb.TokenIds(ids=ids))))
        row = amap[:, :, -1, :].mean(axis=1)  # (layers, positions): the last token's query, heads averaged
        assert [a.layer for a in t.attention] == list(range(amap.shape[0]))
        for a in t.attention:
            best = np.argsort(-row[a.layer], kind="stable")[:3]
            assert list(a.positions) == best.tolist()
            np.testing.assert_allclose(a.weights, row[a.layer][best], atol=1e-4)
    plain = gen(stub, prompt, temperature=0, max_new_tokens=6)
    assert ids_of(plain) == generated and not plain.tokens[0].attention  # asked for, or not at all


def test_a_failing_step_fails_its_sequences_and_generation_goes_on(model_dir: Path) -> None:
    st = ServerThread(config(model_dir)).start()
    try:
        assert st.server.scheduler is not None
        rt = st.server.scheduler.runtime
        real = rt.decode_step
        calls = {"n": 0}

        def flaky(*a, **kw):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("the device fell over")
            return real(*a, **kw)

        rt.decode_step = flaky  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as e:
            gen(st.stub(), "The king", max_new_tokens=5)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "device" not in e.value.details()
        assert gen(st.stub(), "The king", max_new_tokens=5).usage.generated_tokens == 5
        assert metrics(st)[("attnserve_generate_running_sequences", ())] == 0
    finally:
        st.stop()


def test_a_stream_that_fails_before_its_first_token_logs_the_fault_under_the_id_it_answers(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault of the server's own while a stream's prompt is made ready is INTERNAL, as later in the
    stream, and its trace is logged under the id the client is told (it had been answered unlogged)."""
    st = ServerThread(config(model_dir)).start()
    try:
        servicer = st.server.servicer

        async def broken(*a, **kw):  # type: ignore[no-untyped-def]
            raise RuntimeError("the prompt's tokenizer fell over")

        servicer._generation = broken  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as e, caplog.at_level(logging.ERROR, "service.servicer"):
            list(st.stub().GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=5), timeout=30))
        assert e.value.code() == grpc.StatusCode.INTERNAL and "tokenizer" not in e.value.details()
        error = e.value.details().rsplit(" ", 1)[-1]
        (record,) = [r for r in caplog.records if getattr(r, "error_id", None) == error]
        assert record.rpc == "GenerateStream" and "fell over" in str(record.exc_info[1])  # type: ignore
        del servicer._generation  # the class's own again
        assert len(list(st.stub().GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=5)))) >= 1
    finally:
        st.stop()
