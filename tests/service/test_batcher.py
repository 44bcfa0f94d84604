"""The batcher alone, with a fake runner in place of the model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher, BatchLimits
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics


class FakeModel:
    """Records each batch; doubles each request's ids; can be made to fail or to hold."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.entered: list[int] = []  # batch sizes, as each batch reaches the model (before the gate)
        self.fail_next = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.entered.append(len(batch))
        self.gate.wait(5)
        self.batches.append([len(x) for x in batch])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return [x * 2 for x in batch]


def make(model: FakeModel, **limits: float) -> Batcher:
    bl = BatchLimits(**limits)  # type: ignore[arg-type]
    return Batcher("encode", model, bl, ThreadPoolExecutor(bl.max_in_flight), Metrics(), max_len=64)


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


def test_a_failed_batch_fails_its_requests_only() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model)
        b.start()
        model.fail_next = True
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(ids(2))
        assert int((await b.submit(ids(2, 7))).value[0]) == 14
        await b.stop()

    asyncio.run(main())


def test_cancelled_and_expired_requests_never_reach_the_model() -> None:
    async def main() -> None:
        model = FakeModel()
        b = make(model, max_queue_delay_s=0.2, max_batch_size=32)
        b.start()
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(b.submit(ids(5)))
        expired = asyncio.ensure_future(b.submit(ids(6), deadline=loop.time() - 1))
        kept = asyncio.ensure_future(b.submit(ids(7)))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert len((await kept).value) == 7
        with pytest.raises(DeadlineExceeded):
            await expired
        assert model.batches == [[7]]
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
        b = make(FakeModel(), max_queue_size=2)
        with pytest.raises(Overloaded):
            b.reserve(3)
        assert b.depth == 0
        b.reserve(2)  # fits

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
