"""The batcher alone, with a fake runner in place of the model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
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
        self.fail_next = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.gate.wait(5)
        self.batches.append([len(x) for x in batch])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return [x * 2 for x in batch]


def make(model: FakeModel, **limits: float) -> Batcher:
    return Batcher("encode", model, BatchLimits(**limits), ThreadPoolExecutor(1), Metrics(), max_len=64)  # type: ignore[arg-type]


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
        assert model.batches[0] == [3] and max(len(x) for x in model.batches[1:]) == 8
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
