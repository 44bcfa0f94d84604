"""Handoff alone: calls made on worker threads run on the event loop's thread, in order."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import pytest

from service.handoff import Handoff


async def _from_threads(handoff: Handoff, threads: int, calls: int) -> list[tuple[int, int, int]]:
    """Each thread hands off `calls` calls; what ran, as (thread, index, the thread it ran on)."""
    ran: list[tuple[int, int, int]] = []
    done = asyncio.Event()

    def record(t: int, i: int) -> None:
        ran.append((t, i, threading.get_ident()))
        if len(ran) == threads * calls:
            done.set()

    def work(t: int) -> None:
        for i in range(calls):
            handoff.call(record, t, i)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    await asyncio.wait_for(done.wait(), 10)
    for w in workers:
        w.join()
    return ran


@pytest.mark.parametrize("eventfd", [True, False])
def test_calls_from_threads_run_on_the_loop_in_their_order(eventfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not eventfd:
        monkeypatch.delattr(os, "eventfd", raising=False)
    elif not hasattr(os, "eventfd"):
        pytest.skip("no eventfd on this system")

    async def main() -> list[tuple[int, int, int]]:
        handoff = Handoff(asyncio.get_running_loop())
        assert (handoff._fd >= 0) == eventfd
        ran = await _from_threads(handoff, threads=4, calls=500)
        handoff.close()
        return ran

    ran = asyncio.run(main())
    assert {ident for _, _, ident in ran} == {threading.get_ident()}
    for t in range(4):
        assert [i for u, i, _ in ran if u == t] == list(range(500))


def test_a_failing_call_is_logged_and_the_rest_still_run(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[int] = []

    def fail() -> None:
        raise ValueError("boom")

    async def main() -> None:
        handoff = Handoff(asyncio.get_running_loop())
        finished = asyncio.Event()

        def work() -> None:
            handoff.call(ran.append, 1)
            handoff.call(fail)
            handoff.call(ran.append, 2)
            handoff.call(finished.set)

        threading.Thread(target=work).start()
        await asyncio.wait_for(finished.wait(), 10)
        handoff.close()

    with caplog.at_level(logging.ERROR, logger="service.handoff"):
        asyncio.run(main())
    assert ran == [1, 2]
    assert "boom" in caplog.text


def test_close_runs_what_is_queued_and_stops_watching() -> None:
    async def main() -> None:
        handoff = Handoff(asyncio.get_running_loop())
        ran: list[int] = []
        t = threading.Thread(target=lambda: [handoff.call(ran.append, i) for i in range(3)])
        t.start()
        t.join()  # queued, and the loop has not run since
        fd = handoff._fd
        handoff.close()
        assert ran == [0, 1, 2]
        if fd >= 0:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed
        handoff.call(ran.append, 3)  # after close: still reaches the loop, by call_soon_threadsafe
        await asyncio.sleep(0)
        assert ran == [0, 1, 2, 3]

    asyncio.run(main())
