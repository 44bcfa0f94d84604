"""The batcher alone, with a fake runner in place of the model."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from service.batcher import Batcher, BatchLimits, BatchThreads, Call, Pending
from service.config import HIGH, LOW, NORMAL
from service.engine import Engine
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics
from service.runtime import Runtime, RuntimeOptions

POISON = 666  # a request of this value makes its whole batch fail


class FakeModel:
    """Records each batch; doubles each request's ids; fails a batch holding POISON; can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered: list[int] = []  # batch sizes, as each batch reaches the model (before the gate)
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.entered.append(len(batch))
        self.gate.wait(5)
        self.batches.append([len(x) for x in batch])
        if any(int(x[0]) == POISON for x in batch):
            raise RuntimeError("poison in the batch")
        return [x * 2 for x in batch]


def make(model: FakeModel, **limits: float) -> Batcher:
    bl = BatchLimits(**limits)  # type: ignore[arg-type]
    return Batcher("encode", model, bl, BatchThreads(bl.max_in_flight, "test-batch"), Metrics(), max_len=64)


def test_batch_threads_run_jobs_in_order_survive_a_failing_one_and_finish_the_queue_on_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[tuple[int, str]] = []
    started = threading.Event()
    names: list[str] = []

    def init(tag: str) -> None:
        names.append(f"{tag}:{threading.current_thread().name}")

    threads = BatchThreads(1, "test-jobs", init, ("init",))

    def job(i: int) -> Callable[[], None]:
        def run() -> None:
            if i == 0:
                started.wait(5)  # the rest queue up behind it
            if i == 3:
                raise RuntimeError("job 3 fails")
            ran.append((i, threading.current_thread().name))

        return run

    for i in range(50):
        threads.submit(job(i))
    started.set()
    threads.shutdown()  # runs what is queued, then joins
    assert [i for i, _ in ran] == [i for i in range(50) if i != 3]
    assert {name for _, name in ran} == {"test-jobs-0"}
    assert names == ["init:test-jobs-0"]
    assert "batch job failed" in caplog.text and "job 3 fails" in caplog.text


def ids(n: int, v: int = 1) -> np.ndarray:
    return np.full(n, v, np.int64)


def test_each_request_gets_its_own_result_and_batches_form_under_load() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=8)
        b.start()
        model.gate.clear()  # hold the first batch so the rest queue up behind it
        first = asyncio.ensure_future(b.submit(ids(3, 100)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit(ids(3, v))) for v in range(10)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert [int(r.value[0]) for r in results] == [200, *[2 * v for v in range(10)]]
        assert model.entered[0] == 1 and max(model.entered[1:]) == 8
        assert all(r.compute_seconds > 0 for r in results)
        await b.stop()

    asyncio.run(main())


def test_batches_respect_the_token_budget_and_group_similar_lengths() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=16, max_batch_tokens=64, max_queue_delay_s=0.1)
        lengths = [10, 60, 12, 58, 11, 9]
        futs = [asyncio.ensure_future(b.submit(ids(n))) for n in lengths]
        await asyncio.sleep(0)
        b.start()
        await asyncio.gather(*futs)
        for batch in model.batches:
            assert len(batch) * max(batch) <= 64, batch
        assert model.batches[0][0] == 10  # the oldest goes first
        assert sorted(model.batches[0]) == [9, 10, 11, 12]  # with its neighbours in length
        await b.stop()

    asyncio.run(main())


def test_a_failed_batch_fails_its_requests_only_while_another_batch_runs_beside_it() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=2, max_in_flight=2)
        b.start()
        model.gate.clear()  # both batches reach the model and are held there together
        doomed = asyncio.ensure_future(b.submit(ids(2, POISON)))
        await until(lambda: model.entered == [1])
        fine = [asyncio.ensure_future(b.submit(ids(2, v))) for v in (3, 4)]
        await until(lambda: model.entered == [1, 2])  # a full second batch beside the held first one
        model.gate.set()
        with pytest.raises(RuntimeError, match="poison"):
            await doomed
        assert [int(r.value[0]) for r in await asyncio.gather(*fine)] == [6, 8]
        assert int((await b.submit(ids(2, 7))).value[0]) == 14
        await b.stop()

    asyncio.run(main())


class Halt(BaseException):
    """Not an Exception: what a runner should never raise, and its callers must still hear of."""


def test_a_batch_with_too_few_results_or_a_base_exception_fails_its_callers_and_the_next_batch_runs() -> None:
    def runner(batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        if int(batch[0][0]) == 1:
            return []
        if int(batch[0][0]) == 2:
            raise Halt("halted")
        return [x * 2 for x in batch]

    async def main() -> None:
        threads = BatchThreads(1, "test-batch")
        b = Batcher("encode", runner, BatchLimits(max_batch_size=1), threads, Metrics(), max_len=64)
        b.start()
        with pytest.raises(RuntimeError, match="0 results for a batch of 1"):
            await asyncio.wait_for(b.submit(ids(3, 1)), 5)
        with pytest.raises(Halt):
            await asyncio.wait_for(b.submit(ids(3, 2)), 5)
        assert (await asyncio.wait_for(b.submit(ids(3, 5)), 5)).value.tolist() == [10, 10, 10]
        await asyncio.wait_for(b.stop(), 5)
        threads.shutdown()

    asyncio.run(main())


def test_cancelled_and_expired_requests_never_reach_the_model() -> None:
    async def main() -> None:
        model = FakeModel()
        metrics = Metrics()
        b = make(model, max_queue_delay_s=0.2, max_batch_size=32)
        b.metrics = metrics
        b.start()
        gone = asyncio.ensure_future(b.submit(ids(5)))
        expiring = asyncio.ensure_future(b.submit(ids(6), deadline=time.monotonic() + 0.05))
        kept = asyncio.ensure_future(b.submit(ids(7)))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert b.depth == 2  # the cancelled request left the queue at once, not at the next batch
        assert len((await kept).value) == 7
        with pytest.raises(DeadlineExceeded, match="queued"):  # expired in the queue: the collector's branch
            await expiring
        assert model.batches == [[7]]
        dropped = {r: metrics.dropped.labels("encode", r)._value.get() for r in ("cancelled", "deadline")}
        assert dropped == {"cancelled": 1, "deadline": 1}
        with pytest.raises(DeadlineExceeded, match="arrived"):
            await b.submit(ids(3), deadline=time.monotonic() - 1)
        await b.stop()

    asyncio.run(main())


def test_cancelled_requests_give_their_queue_places_back() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_queue_size=4, max_queue_delay_s=10, max_batch_size=32)
        b.start()
        ghosts = [asyncio.ensure_future(b.submit(ids(2))) for _ in range(4)]
        await asyncio.sleep(0.01)
        for g in ghosts:
            g.cancel()
        await asyncio.sleep(0.01)
        live = [asyncio.ensure_future(b.submit(ids(2, v))) for v in range(4)]  # refused if the ghosts held places
        await asyncio.sleep(0.01)
        await b.stop()
        assert [int(r.value[0]) for r in await asyncio.gather(*live)] == [0, 2, 4, 6]

    asyncio.run(main())


def test_a_request_whose_deadline_cannot_be_met_is_refused_before_it_is_queued() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=1, max_in_flight=1)
        b.start()
        await b.submit(ids(10))  # one batch measured: the seconds a token costs
        model.gate.clear()
        held = [asyncio.ensure_future(b.submit(ids(10))) for _ in range(20)]
        await until(lambda: b.depth == 19)
        assert b.expected_wait() > 0
        with pytest.raises(Overloaded, match="before the deadline") as refused:
            b.admit(1, time.monotonic() + b.expected_wait() / 2)
        assert refused.value.reason == "QUEUE_TOO_LONG"  # not a full queue: a later call, or another replica, fits
        b.admit(1, time.monotonic() + b.expected_wait() * 2 + 1)  # time enough: admitted
        model.gate.set()
        await asyncio.gather(*held)
        await b.stop()

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_and_stop_drains() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_queue_size=2, max_queue_delay_s=10, max_batch_size=32)
        b.start()
        waiting = [asyncio.ensure_future(b.submit(ids(2))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="queue is full"):
            await b.submit(ids(2))
        await b.stop()  # ends the wait for a fuller batch and runs what is queued
        assert all(len(r.value) == 2 for r in await asyncio.gather(*waiting))

    asyncio.run(main())


def test_a_request_of_several_texts_is_queued_whole_or_not_at_all() -> None:
    async def main() -> None:
        b = make(FakeModel(), max_queue_size=3, max_queue_tokens=10)
        with pytest.raises(Overloaded, match="queue is full"):
            b.enqueue([ids(2)] * 4, None)  # four texts, three places
        with pytest.raises(Overloaded, match="tokens"):
            b.enqueue([ids(4)] * 3, None)  # twelve tokens, ten allowed
        assert b.depth == 0 and b.expected_wait() == 0
        items = b.enqueue([ids(2, v) for v in range(3)], None)  # fits: in one step, in order
        assert [int(p.ids[0]) for p in b._queues[NORMAL]] == [0, 1, 2] and b.depth == 3
        b.start()
        assert [int(r.value[0]) for r in await b.wait(items)] == [0, 2, 4]
        await b.stop()

    asyncio.run(main())


def test_a_request_split_across_batches_is_answered_once_in_order() -> None:
    """A request of more texts than a batch holds runs in several batches and gets every result, in
    its order, on one answer; a request that fails in one of its batches takes the rest of its
    texts out of the queue and fails alone."""

    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=2, max_in_flight=1)
        model.gate.clear()
        b.start()
        blocker = asyncio.ensure_future(b.submit(ids(1, 9)))
        await until(lambda: len(model.entered) == 1)  # the model is busy: what follows queues up
        big = b.enqueue([ids(3, v) for v in range(4)], None)  # two whole batches
        poisoned = b.enqueue([ids(3, POISON)] + [ids(3, 7)] * 3, None)
        other = asyncio.ensure_future(b.submit(ids(3, 4)))
        results = asyncio.ensure_future(b.wait(big))
        failed = asyncio.ensure_future(b.wait(poisoned))
        model.gate.set()
        assert [int(r.value[0]) for r in await results] == [0, 2, 4, 6]
        with pytest.raises(RuntimeError, match="poison"):
            await failed
        assert int((await other).value[0]) == 8 and int((await blocker).value[0]) == 18
        ran = [n for batch in model.batches for n in batch]
        assert len(ran) == 1 + 4 + 2 + 1  # the poisoned request's last two texts never ran
        assert b.depth == 0 and b.expected_wait() >= 0
        await b.stop()

    asyncio.run(main())


async def until(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    stop_at = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < stop_at, "timed out"
        await asyncio.sleep(0.005)


def test_a_full_batch_starts_beside_a_running_one_up_to_the_in_flight_bound() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=4, max_in_flight=2)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(ids(3, 100)))
        await until(lambda: model.entered == [1])
        rest = [asyncio.ensure_future(b.submit(ids(3, v))) for v in range(10)]
        await until(lambda: len(model.entered) == 2)  # a full batch of 4 joins the held one at once
        await asyncio.sleep(0.05)
        assert model.entered == [1, 4] and b.depth == 6  # no third: two in flight at most
        model.gate.set()
        results = await asyncio.gather(first, *rest)
        assert [int(r.value[0]) for r in results] == [200, *[2 * v for v in range(10)]]
        await b.stop()

    asyncio.run(main())


def test_a_part_filled_batch_waits_for_the_running_one() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=4, max_in_flight=2)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(ids(3)))
        await until(lambda: model.entered == [1])
        rest = [asyncio.ensure_future(b.submit(ids(3))) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert model.entered == [1] and b.depth == 3  # three of four: they gather, they do not start
        model.gate.set()
        await asyncio.gather(first, *rest)
        assert [len(x) for x in model.batches] == [1, 3]
        await b.stop()

    asyncio.run(main())


def test_one_batch_in_flight_never_overlaps() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=2, max_in_flight=1)
        b.start()
        model.gate.clear()
        futs = [asyncio.ensure_future(b.submit(ids(3))) for _ in range(7)]
        await until(lambda: len(model.entered) == 1)
        await asyncio.sleep(0.05)
        assert len(model.entered) == 1 and b.depth == 7 - model.entered[0]
        model.gate.set()
        await asyncio.gather(*futs)
        assert sum(model.entered) == 7
        await b.stop()

    asyncio.run(main())


def test_stop_waits_for_every_batch_in_flight() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_batch_size=2, max_in_flight=2)
        b.start()
        model.gate.clear()
        futs = [asyncio.ensure_future(b.submit(ids(3, v))) for v in range(5)]
        await until(lambda: len(model.entered) == 2)
        stopping = asyncio.ensure_future(b.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()
        model.gate.set()
        await stopping
        assert all(f.done() for f in futs)
        assert [int(f.result().value[0]) for f in futs] == [2 * v for v in range(5)]

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_batches_in_flight_are_at_most_the_cores_the_process_may_use(model_dir: Path) -> None:
    runtime = Runtime(model_dir, RuntimeOptions(device="cpu", warmup=False))
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})  # this thread, as a server pinned to one core
        one = Engine(runtime, BatchLimits(max_in_flight=2), Metrics())
    finally:
        os.sched_setaffinity(0, before)
    assert one.encoder.limits.max_in_flight == one.attender.limits.max_in_flight == 1
    if len(before) >= 2:
        assert Engine(runtime, BatchLimits(max_in_flight=2), Metrics()).encoder.limits.max_in_flight == 2


def reference_take(queue: list[Pending], size: int, budget: int) -> list[Pending]:
    """The batch as the collector chose it first: every queued sequence sorted by closeness of length
    to the oldest, then age, and taken in that order where it fits both budgets."""
    first, rest = queue[0], queue[1:]
    batch, longest = [first], len(first.ids)
    for p in sorted(rest, key=lambda p: (abs(len(p.ids) - len(first.ids)), p.call.enqueued_at)):
        if len(batch) >= size:
            break
        if max(longest, len(p.ids)) * (len(batch) + 1) > budget:
            continue
        batch.append(p)
        longest = max(longest, len(p.ids))
    return batch


def test_a_batch_is_the_oldest_then_the_closest_in_length_within_both_budgets_for_any_queue() -> None:
    rng = random.Random(0)
    loop = asyncio.new_event_loop()
    threads = BatchThreads(1, "test-take")
    try:
        for _ in range(600):
            size, budget = rng.choice([1, 2, 3, 8, 32]), rng.choice([8, 16, 64, 100, 512])
            b = Batcher("encode", FakeModel(), BatchLimits(size, budget), threads, Metrics(), max_len=64)
            t = 0.0
            for _ in range(rng.randint(1, 60)):  # requests of 1-4 sequences, some enqueued at the same instant
                n = rng.randint(1, 4)
                t += rng.choice([0.0, 0.001])
                call = Call(loop.create_future(), t, None, [None] * n, n)
                b._queues[NORMAL].extend(
                    Pending(ids(rng.choice([3, 8, 8, 8, 9, 16, 33, 64])), call, i) for i in range(n)
                )
            while b._queues[NORMAL]:
                before = list(b._queues[NORMAL])
                want = reference_take(before, size, budget)
                got = b._take()
                assert [id(p) for p in got] == [id(p) for p in want]
                taken = {id(p) for p in got}
                assert [id(p) for p in b._queues[NORMAL]] == [id(p) for p in before if id(p) not in taken]  # order
    finally:
        threads.shutdown()
        loop.close()


def test_an_expired_request_is_failed_wherever_it_waits_in_the_queue() -> None:
    async def main() -> None:
        b = make(FakeModel(), max_batch_size=1, max_in_flight=1)
        now = time.monotonic()
        a = b.enqueue([ids(4)], now + 0.05)
        c = b.enqueue([ids(4)], now + 0.1)
        d = b.enqueue([ids(4)], None)
        assert b._take() == a  # nothing has expired: the oldest
        await asyncio.sleep(0.12)
        assert b._take() == d  # the earliest deadline left with a's batch; c's passed in the queue all the same
        with pytest.raises(DeadlineExceeded, match="queued"):
            await c[0].call.future
        # a later request with an earlier deadline than any queued: found too
        e = b.enqueue([ids(4)], time.monotonic() + 10)
        f = b.enqueue([ids(4)], time.monotonic() + 0.01)
        await asyncio.sleep(0.02)
        assert b._take() == e
        with pytest.raises(DeadlineExceeded, match="queued"):
            await f[0].call.future
        assert b.depth == 0
        b.threads.shutdown()

    asyncio.run(main())


def test_higher_priority_work_goes_first_and_a_batch_holds_one_priority() -> None:
    """Queued behind a running batch: low, normal, then high work. The high goes next, then the
    normal, then the low, each in order of arrival within its priority and none in another's batch."""

    async def main() -> None:
        model = FakeModel()
        model.gate.clear()
        b = make(model, max_in_flight=1)
        b.start()
        running = b.enqueue([ids(2)], None)
        await until(lambda: model.entered == [1])  # the model is busy with it
        # lengths tell the priorities apart in what the model saw: low 7, normal 3, high 5
        low = [b.enqueue([ids(7, v)], None, LOW) for v in range(2)]
        normal = b.enqueue([ids(3)], None, NORMAL)
        high = [b.enqueue([ids(5, v)], None, HIGH) for v in range(2)]
        assert b.depth == 5
        model.gate.set()
        for items in (running, *low, normal, *high):
            await b.wait(items)
        assert model.batches == [[2], [5, 5], [3], [7, 7]]
        await b.stop()

    asyncio.run(main())


def test_a_request_is_admitted_for_the_work_queued_at_its_priority_and_above_only() -> None:
    """A deadline is weighed against the work ahead of a request, which lower work is not: high work
    is let in past a long low queue that would refuse normal and low work for the same deadline."""

    async def main() -> None:
        b = make(FakeModel())  # not started: what is queued stays queued
        b._seconds_per_token = 0.01
        b.enqueue([ids(50), ids(50)], None, LOW)  # ~1 s of work
        b.enqueue([ids(10)], None, NORMAL)  # ~0.1 s
        assert b.expected_wait(HIGH) == 0
        assert b.expected_wait(NORMAL) == pytest.approx(0.1)
        assert b.expected_wait(LOW) == b.expected_wait() == pytest.approx(1.1)
        soon = time.monotonic() + 0.5
        b.admit(1, soon, HIGH)
        b.admit(1, soon, NORMAL)
        with pytest.raises(Overloaded, match="queued ahead"):
            b.admit(1, soon, LOW)
        with pytest.raises(Overloaded, match="queued ahead"):
            b.admit(1, time.monotonic() + 0.1, NORMAL)
        b.threads.shutdown()

    asyncio.run(main())


def test_expired_and_cancelled_requests_leave_whichever_priority_they_wait_at() -> None:
    async def main() -> None:
        b = make(FakeModel(), max_batch_size=1)
        now = time.monotonic()
        high = b.enqueue([ids(4)], None, HIGH)
        expired = b.enqueue([ids(6)], now + 0.01, LOW)
        gone = b.enqueue([ids(8), ids(8)], None, NORMAL)
        normal = b.enqueue([ids(5)], None, NORMAL)
        gone[0].call.future.cancel()
        await asyncio.sleep(0)  # its done callback takes it out of the queue
        assert b.depth == 3 and b.expected_wait(NORMAL) == 0  # (no batch has run: no cost a token yet)
        assert sum(b._tokens_at) == 4 + 6 + 5 and b._tokens_at == [4, 5, 6]
        await asyncio.sleep(0.02)
        assert b._take() == high
        with pytest.raises(DeadlineExceeded, match="queued"):
            await expired[0].call.future
        assert b._take() == normal
        assert b._take() == [] and b.depth == 0 and sum(b._tokens_at) == 0 and b._tokens_at == [0, 0, 0]
        b.threads.shutdown()

    asyncio.run(main())


def test_at_a_full_queue_higher_work_takes_the_places_of_the_lower_work_queued_last() -> None:
    """A flood of low work cannot keep out high: at a full queue, whole requests of a lower priority
    that have not started are refused (QUEUE_FULL) for it, the lowest and latest first; work at or
    above its priority never is."""

    async def main() -> None:
        model = FakeModel()
        model.gate.clear()
        b = make(model, max_queue_size=6, max_queue_tokens=40, max_in_flight=1, max_batch_size=2)
        b.start()
        started = b.enqueue([ids(2), ids(2), ids(2)], None, LOW)  # its first two run, the third waits
        await until(lambda: model.entered == [2])
        low = [b.enqueue([ids(3)], None, LOW) for _ in range(2)]
        normal = b.enqueue([ids(4), ids(4)], None, NORMAL)
        assert b.depth == 5
        high = b.enqueue([ids(5), ids(5)], None, HIGH)  # one place free: the latest low call gives its own
        with pytest.raises(Overloaded, match="displaced by work of a higher priority"):
            await low[1][0].call.future
        assert not low[0][0].call.future.done() and b.depth == 6
        more = b.enqueue([ids(5)], None, HIGH)  # the other low call's place; the started one keeps its own
        with pytest.raises(Overloaded, match="displaced"):
            await low[0][0].call.future
        with pytest.raises(Overloaded, match="queue is full"):  # nothing below NORMAL left to give way
            b.enqueue([ids(1)], None, NORMAL)
        with pytest.raises(Overloaded, match="queue is full"):
            b.admit(1, None, LOW)
        high_tokens = b.enqueue([ids(20)], None, HIGH)  # by tokens too: normal gives its 8 (and its place)
        with pytest.raises(Overloaded, match="displaced"):
            await normal[0].call.future
        assert sum(b._tokens_at) == 2 + 10 + 5 + 20 and b.depth == 5
        assert b.metrics.dropped.labels("encode", "displaced")._value.get() == 4
        model.gate.set()
        for items in (started, high, more, high_tokens):
            await b.wait(items)
        await b.stop()

    asyncio.run(main())


def test_higher_work_starts_beside_running_batches_of_lower_work_only() -> None:
    """With two batches in flight, a part-filled batch waits for the running one, unless every batch
    running is of a lower priority than it: then it starts at once beside them."""

    async def main() -> None:
        model = FakeModel()
        model.gate.clear()
        b = make(model, max_in_flight=2)
        b.start()
        low = b.enqueue([ids(7)], None, LOW)
        await until(lambda: model.entered == [1])
        later_low = b.enqueue([ids(7, 2)], None, LOW)  # part-filled, beside a batch of its own priority: waits
        await asyncio.sleep(0.05)
        assert model.entered == [1]
        high = b.enqueue([ids(5)], None, HIGH)  # beside low work only: at once
        await until(lambda: model.entered == [1, 1])
        normal = b.enqueue([ids(3)], None, NORMAL)  # beside a high batch (and no slot free): waits
        await asyncio.sleep(0.05)
        assert model.entered == [1, 1] and b.depth == 2
        model.gate.set()
        for items in (low, later_low, high, normal):
            await b.wait(items)
        assert model.batches[2:] == [[3], [7]]  # then normal, then low
        await b.stop()

    asyncio.run(main())
