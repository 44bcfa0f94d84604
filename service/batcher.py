"""Dynamic batching for the single-pass graphs (encode, attention).

One ``Batcher`` per graph owns a bounded queue and the only task that forms batches, in the
manner of Ray Serve's ``@serve.batch`` and text-embeddings-inference's queue:

* ``admit()`` refuses at once, before any work is spent on a request, what would not fit the
  queue or could not run before its deadline given the work queued ahead of it (estimated
  from the time recent batches took per token). ``enqueue()`` queues all of a request's
  sequences in one synchronous step, or none of them; ``wait()`` awaits their results, which
  come back together on one future a request (not one a sequence: each future costs the event
  loop a callback). A caller that goes away takes its entries out of the queue at once, so
  cancelled calls never hold places that live ones are refused for.
* The collector waits for a first request, then fills the batch up to ``max_batch_size``
  requests and ``max_batch_tokens`` padded tokens, or until ``max_queue_delay`` has passed
  since that first request. With the default delay of 0 it takes what is queued the moment
  the model is free, as text-embeddings-inference does: an idle server adds no wait, and
  under load the next batch gathers while the current one runs. The oldest request always
  goes first; the rest are picked by closeness of length to it, so a batch pads little.
* Each priority (``service.config.PRIORITIES``) has its queue, and a batch is formed from the
  highest that holds any: work of a higher priority goes ahead of all that waits below it, as
  Triton's priority levels do. A batch holds one priority only: on a CPU a batch takes time in
  proportion to its texts, so lower work filling its room would delay the higher work it came
  with. Lower work waits while higher keeps the model busy; its deadline bounds that wait.
  Where the queue is full, higher work takes the places of the lower work queued last (whole
  requests none of whose sequences has started), which is refused as a full queue refuses:
  so that a flood of low work cannot keep out what is to go ahead of it.
* Requests whose caller has gone (cancelled future) or whose deadline has passed are dropped
  before the model sees them.
* The batch runs on a batch thread (``BatchThreads``) so the event loop never blocks; its results
  come back through an eventfd and are set only on futures that are still waiting, and an
  exception reaches every future of its batch and no other.
* Up to ``max_in_flight`` batches run at once (2 by default). A second batch starts beside a
  running one only when a full batch is queued: then the model has work while the first one's
  results go back to their callers. A part-filled batch waits for the running one to finish and
  gathers meanwhile, so light load still forms batches as large as one batch in flight would;
  but not for running batches of a lower priority only: higher work starts beside them at once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service.config import LOW, NORMAL, PRIORITIES
from service.errors import QUEUE_TOO_LONG, SHUTTING_DOWN, DeadlineExceeded, ModelNotReady, Overloaded
from service.handoff import Handoff
from service.metrics import Metrics

log = logging.getLogger(__name__)

R = TypeVar("R")

# A request is admitted only if the work queued ahead of it is expected to take at most this share of the
# time left before its deadline: the rest is for its own batch, its answer, and the estimate's error.
# At 1.0, under a 3x overload, a quarter of the accepted calls still missed their deadline (README).
DEADLINE_HEADROOM = 0.75

# Padded tokens a batch holds by default. On the CPU a model's throughput peaks between a few hundred
# and a thousand tokens a batch for each thread that runs it and falls beyond (cache-bound: the
# default model on one core, texts of 256 tokens, 124-131 texts/s at batches of 256-512 tokens, 98-103
# at 8,192; on two threads 142 at 512, 158 at 1,024, 157-164 at 2,048). Over gRPC on one core, 1,024
# served 2-3% more than 512 at 64-token texts and level or better at 256 (a batch's dispatch and
# answer shared by twice the texts), 2,048 and 4,096 less at 256 (README). On a GPU it grows with the batch.
CPU_BATCH_TOKENS = 1024  # a thread
CUDA_BATCH_TOKENS = 8192


def default_batch_tokens(cuda: bool, threads: int = 1) -> int:
    """The padded tokens a batch holds by default: on CUDA, or on the CPU with ``threads`` intra-op threads."""
    return CUDA_BATCH_TOKENS if cuda else min(CUDA_BATCH_TOKENS, CPU_BATCH_TOKENS * max(1, threads))


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = CPU_BATCH_TOKENS  # padded tokens: batch size x longest sequence
    max_queue_delay_s: float = 0.0  # extra wait for a fuller batch; 0: batches gather while the model runs
    max_queue_size: int = 1024  # sequences (texts) waiting
    max_queue_tokens: int = 65536  # their tokens, summed
    max_in_flight: int = 2  # batches running at once

    def __post_init__(self) -> None:
        sizes = (self.max_batch_size, self.max_batch_tokens, self.max_queue_size, self.max_queue_tokens)
        if min(*sizes, self.max_in_flight) < 1:
            raise ValueError(f"batch limits must be positive: {self}")
        if not 0 <= self.max_queue_delay_s < float("inf"):  # also refuses nan
            raise ValueError(f"max_queue_delay_s must be a finite number >= 0, got {self.max_queue_delay_s}")


@dataclass
class Call:
    """One request's sequences, answered together on one future once the last of them is computed."""

    future: asyncio.Future[None]
    enqueued_at: float
    deadline: float | None  # time.monotonic() value, or None for no deadline
    results: list[Any]  # each sequence's result, in the request's order
    left: int  # sequences not yet computed
    priority: int = NORMAL  # the queue it waits in (an index of PRIORITIES)
    started_at: float = 0.0  # when the last batch holding one of its sequences started
    compute_seconds: float = 0.0  # the longest of those batches


@dataclass
class Pending:
    """One sequence in the queue."""

    ids: np.ndarray  # (T,) int64 token ids
    call: Call
    index: int  # its place among the call's sequences
    queued: bool = True  # until taken into a batch or dropped


@dataclass
class Result(Generic[R]):
    value: R
    queue_seconds: float
    compute_seconds: float


RunBatch = Callable[[Sequence[np.ndarray]], Sequence[Any]]


class BatchThreads:
    """``n`` threads that run the jobs put on one queue, in order: a batcher's batches.

    What a ``ThreadPoolExecutor`` does for a batch, without what a batch has no use for: its
    result comes back through the batcher's eventfd, not a ``concurrent.futures.Future`` with its
    condition variable, and there is no idle-thread bookkeeping. On one core a batch-1 encode
    handed over and answered this way took 0.08 ms longer than run inline, against 0.16 ms
    through the executor. Jobs do not raise (the batcher's catch everything and hand it back);
    one that does is logged and the thread goes on."""

    def __init__(
        self,
        n: int,
        name: str,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, args=(initializer, initargs), name=f"{name}-{i}", daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], None], /) -> None:
        self._jobs.put(fn)

    def shutdown(self) -> None:
        """Run the jobs already queued, then end the threads and wait for them."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _work(self, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
        if initializer is not None:
            initializer(*initargs)
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException:  # a job's own failure, not the thread's: the next batch still runs
                log.exception("batch job failed")


@dataclass
class Batcher:
    """Batches requests for one graph. ``run_batch`` takes token arrays and returns one result each."""

    name: str
    run_batch: RunBatch
    limits: BatchLimits
    threads: BatchThreads  # where its batches run
    metrics: Metrics
    max_len: int  # the longest sequence a batch may hold
    # the queued sequences of each priority, highest first, each in order of arrival
    _queues: tuple[list[Pending], ...] = field(default_factory=lambda: tuple([] for _ in PRIORITIES))
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _closed: bool = False
    _in_flight: int = 0  # batches running now
    _running_at: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))  # ... of each priority
    _drained: asyncio.Future[None] | None = None  # what stop() awaits while batches still run
    # tokens of the queued sequences of each priority
    _tokens_at: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))
    # seconds of model time per token, from recent batches (shared among the batches that ran together):
    # what the queue ahead of a new request will cost. 0 until a batch has run: nothing is shed before.
    _seconds_per_token: float = 0.0
    _handoff: Handoff | None = None  # batch results back onto the event loop
    # at most the earliest deadline among the queued sequences (inf: none has one): until it passes,
    # no queued request can have expired, and the queue is not scanned for them
    _earliest_deadline: float = math.inf

    def __post_init__(self) -> None:
        # this graph's series, looked up once rather than on every request
        self._depth = self.metrics.queue_depth.labels(self.name)
        self._queue_seconds = [self.metrics.queue_seconds.labels(self.name, p) for p in PRIORITIES]
        self._batch_size = self.metrics.batch_size.labels(self.name)
        self._batch_tokens = self.metrics.batch_tokens.labels(self.name)
        self._compute_seconds = self.metrics.compute_seconds.labels(self.name)
        self._token_count = self.metrics.tokens.labels(self.name)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handoff = Handoff(loop)
        self._task = loop.create_task(self._collect(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new requests, let the queued ones run, then end the collector."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._in_flight:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._handoff is not None:
            self._handoff.close()

    @property
    def depth(self) -> int:
        """Sequences queued, of every priority."""
        return sum(map(len, self._queues))

    def expected_wait(self, priority: int = LOW) -> float:
        """Seconds until the model is through with the work queued now at ``priority`` and above (an
        estimate; by default, all of it): what a request of that priority would wait for."""
        return sum(self._tokens_at[: priority + 1]) * self._seconds_per_token

    def admit(self, n: int, deadline: float | None, priority: int = NORMAL) -> None:
        """Refuse at once, before anything is queued or tokenized, a request of n sequences that would
        not fit the queue, or whose deadline passes before the work queued ahead of it (that of its
        priority and above) is done."""
        if self._closed:
            raise ModelNotReady("server is shutting down", SHUTTING_DOWN)
        limit, queued = self.limits.max_queue_size, self.depth
        if queued + n > limit and queued - sum(map(len, self._queues[priority + 1 :])) + n > limit:
            self.metrics.dropped.labels(self.name, "queue_full").inc(n)
            raise Overloaded(f"{self.name} queue is full ({queued} waiting); retry later")
        if deadline is not None:
            wait, left = self.expected_wait(priority), deadline - time.monotonic()
            if left <= 0:
                self.metrics.dropped.labels(self.name, "deadline").inc(n)
                raise DeadlineExceeded("the deadline had passed when the request arrived")
            if wait > DEADLINE_HEADROOM * left:
                self.metrics.dropped.labels(self.name, "deadline").inc(n)
                raise Overloaded(
                    f"{self.name}: about {wait:.3f}s of work is queued ahead, more than the {max(left, 0):.3f}s "
                    "left before the deadline; retry later or elsewhere",
                    QUEUE_TOO_LONG,
                )

    def enqueue(self, seqs: Sequence[np.ndarray], deadline: float | None, priority: int = NORMAL) -> list[Pending]:
        """Queue all of seqs, or none (Overloaded), at ``priority``: one synchronous step, so no other
        request's sequences come between them."""
        n = len(seqs)
        self.admit(n, None, priority)
        tokens = sum(len(x) for x in seqs)
        queued, queued_tokens = self.depth, sum(self._tokens_at)
        over, over_tokens = (
            queued + n - self.limits.max_queue_size,
            queued_tokens + tokens - self.limits.max_queue_tokens,
        )
        displaced: list[list[Pending]] = []
        if over > 0 or over_tokens > 0:
            found = self._displaceable(priority, over, over_tokens)
            if found is None:
                self.metrics.dropped.labels(self.name, "queue_full").inc(n)
                waiting = f"{queued_tokens} tokens" if over_tokens > 0 else str(queued)
                raise Overloaded(f"{self.name} queue is full ({waiting} waiting); retry later")
            displaced = found
        for ids in seqs:
            if not 0 < len(ids) <= self.max_len:  # the servicer bounds inputs; this is a defect, not a client error
                raise ValueError(f"{len(ids)} tokens; the servicer must bound inputs to 1..{self.max_len}")
        for victim in displaced:
            self._unqueue(victim)
            self.metrics.dropped.labels(self.name, "displaced").inc(len(victim))
            victim[0].call.future.set_exception(
                Overloaded(f"{self.name} queue is full: displaced by work of a higher priority; retry later")
            )
        call = Call(asyncio.get_running_loop().create_future(), time.monotonic(), deadline, [None] * n, n, priority)
        items = [Pending(ids, call, i) for i, ids in enumerate(seqs)]
        call.future.add_done_callback(functools.partial(self._forget, items))
        self._queues[priority].extend(items)
        self._tokens_at[priority] += tokens
        if deadline is not None and deadline < self._earliest_deadline:
            self._earliest_deadline = deadline
        self._depth.set(self.depth)
        if self._ready():  # the collector has something to do now (each wake-up costs it a turn of the loop)
            self._wake.set()
        return items

    def _displaceable(self, priority: int, sequences: int, tokens: int) -> list[list[Pending]] | None:
        """The requests queued below ``priority`` whose places free ``sequences`` sequences and
        ``tokens`` tokens, the lowest priority's first and the latest first within one (a request
        whole, and none of which has started); None where those there are would not."""
        found: list[list[Pending]] = []
        for waiting in reversed(self._queues[priority + 1 :]):
            by_call: dict[int, list[Pending]] = {}
            for p in reversed(waiting):
                by_call.setdefault(id(p.call), []).append(p)
            for items in by_call.values():
                call = items[0].call
                if call.started_at or len(items) != call.left or call.future.done():
                    continue  # part of it under way: it finishes
                found.append(items)
                sequences -= len(items)
                tokens -= sum(len(p.ids) for p in items)
                if sequences <= 0 and tokens <= 0:
                    return found
        return None

    async def wait(self, items: Sequence[Pending]) -> list[Result[Any]]:
        """The results of enqueued items (one request's). Cancelled here when the caller goes away: its
        items leave the queue."""
        if not items:
            return []
        call = items[0].call
        await call.future
        queued = call.started_at - call.enqueued_at
        return [Result(v, queued, call.compute_seconds) for v in call.results]

    async def submit(self, ids: np.ndarray, deadline: float | None = None, priority: int = NORMAL) -> Result[Any]:
        self.admit(1, deadline, priority)
        return (await self.wait(self.enqueue([ids], deadline, priority)))[0]

    def _forget(self, items: list[Pending], fut: asyncio.Future[None]) -> None:
        """A request answered before all of its sequences ran (its caller went away, or one of its batches
        failed) takes the rest out of the queue now, not at the next batch."""
        left = [p for p in items if p.queued]
        if left:
            self._unqueue(left)
            if fut.cancelled():
                self.metrics.dropped.labels(self.name, "cancelled").inc(len(left))

    def _unqueue(self, items: Sequence[Pending]) -> None:
        """Take items, all of one priority (one request's, or a batch's), out of their queue."""
        n, priority = len(items), items[0].call.priority
        waiting = self._queues[priority]
        if n <= len(waiting) and all(a is b for a, b in zip(waiting[:n], items, strict=True)):
            del waiting[:n]  # the head of the queue, as a batch of equal lengths mostly is
        else:
            gone = {id(p) for p in items}
            waiting[:] = [p for p in waiting if id(p) not in gone]
        tokens = 0
        for p in items:
            p.queued = False
            tokens += len(p.ids)
        self._tokens_at[priority] -= tokens
        self._depth.set(self.depth)

    def _top(self) -> int:
        """The highest priority with any queued (the lowest where none is): the one a batch is formed from."""
        for priority, waiting in enumerate(self._queues):
            if waiting:
                return priority
        return LOW

    def _first(self) -> list[Pending]:
        """The queue a batch is formed from (empty: none is queued)."""
        return self._queues[self._top()]

    @staticmethod
    def _fail(items: Sequence[Pending], error: BaseException) -> None:
        """Answer with error each request that these items belong to, unless it is answered already."""
        for call in {id(p.call): p.call for p in items}.values():
            if not call.future.done():
                call.future.set_exception(error)

    # --- the collector ---------------------------------------------------------------------

    async def _collect(self) -> None:
        while True:
            while not self._ready():
                if self._closed and not self.depth:
                    return
                self._wake.clear()
                await self._wake.wait()
            first = self._first()[0]
            # fill until full, or until the oldest request has waited max_queue_delay
            while not self._closed and not self._full():
                remaining = first.call.enqueued_at + self.limits.max_queue_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                self._start(batch)

    def _ready(self) -> bool:
        """Whether to form a batch now: work is queued and a slot is free; beside a running batch,
        only a full one (a part-filled batch waits: the running one may be done before it would be),
        or one of a higher priority than every batch running (it does not wait for lower work)."""
        if not self.depth or self._in_flight >= self.limits.max_in_flight:
            return False
        return not self._in_flight or self._full() or not any(self._running_at[: self._top() + 1])

    def _full(self) -> bool:
        """Whether a full batch is queued (of one priority, as a batch is)."""
        first = self._first()
        return len(first) >= self.limits.max_batch_size or self._padded(first) >= self.limits.max_batch_tokens

    def _padded(self, items: Sequence[Pending]) -> int:
        return len(items) * max((len(p.ids) for p in items), default=0)

    def _take(self) -> list[Pending]:
        """The oldest live request, then the live ones closest to it in length, within both budgets.
        Requests whose deadline has passed fail here, before the model sees them.

        This runs once a batch over a queue that may hold hundreds of sequences, so it reads no more
        of it than it must: the queue is scanned for expired deadlines only once the earliest one
        queued may have passed; those as long as the oldest are taken first, in queue order (where
        sorting by closeness of length, then age, puts them), and the rest are sorted only when
        those leave room; the scan ends once nothing more could fit."""
        now = time.monotonic()
        if now >= self._earliest_deadline:
            deadlines = []
            for waiting in self._queues:
                expired = [p for p in waiting if p.call.deadline is not None and now >= p.call.deadline]
                if expired:
                    self._unqueue(expired)
                    self.metrics.dropped.labels(self.name, "deadline").inc(len(expired))
                    self._fail(expired, DeadlineExceeded("deadline passed while the request was queued"))
                deadlines += [p.call.deadline for p in waiting if p.call.deadline is not None]
            self._earliest_deadline = min(deadlines, default=math.inf)
        live = self._first()
        if not live:
            return []
        size, budget = self.limits.max_batch_size, self.limits.max_batch_tokens
        first = live[0]
        batch = [first]
        length = len(first.ids)
        others = []
        for p in itertools.islice(live, 1, None):
            if len(batch) >= size or length * (len(batch) + 1) > budget:
                break  # full: no sequence could join, however short
            if len(p.ids) == length:
                batch.append(p)
            else:
                others.append(p)
        else:
            longest = length
            for p in sorted(others, key=lambda p: (abs(len(p.ids) - length), p.call.enqueued_at)):
                if len(batch) >= size or longest * (len(batch) + 1) > budget:
                    break
                new_longest = max(longest, len(p.ids))
                if new_longest * (len(batch) + 1) > budget:
                    continue
                batch.append(p)
                longest = new_longest
        self._unqueue(batch)
        return batch

    def _start(self, batch: list[Pending]) -> None:
        """Run batch on a batch thread; its outcome comes back to ``_finish`` on the event loop through
        the eventfd. No task a batch: each would cost the loop two more turns a call at light load."""
        handoff = self._handoff
        assert handoff is not None, "batches run only once start() has made the handoff"
        start = time.monotonic()
        self._in_flight += 1
        sharing = self._in_flight  # batches running beside this one, itself included
        priority = batch[0].call.priority  # (a batch is of one priority)
        self._running_at[priority] += 1
        queued = self._queue_seconds[priority]
        for p in batch:
            p.call.started_at = start
            queued.observe(start - p.call.enqueued_at)
        self._batch_size.observe(len(batch))
        self._batch_tokens.observe(self._padded(batch))
        run_batch, seqs, finish = self.run_batch, [p.ids for p in batch], self._finish

        def work() -> None:
            try:
                results = run_batch(seqs)
            except BaseException as e:  # whatever it is, the batch's callers get it rather than wait forever
                handoff.call(finish, batch, start, sharing, None, e)
            else:
                handoff.call(finish, batch, start, sharing, results, None)

        self.threads.submit(work)

    def _finish(
        self,
        batch: list[Pending],
        start: float,
        sharing: int,
        results: Sequence[Any] | None,
        error: BaseException | None,
    ) -> None:
        """A batch's outcome, on the event loop: its callers' results, or its error for each of them."""
        self._in_flight -= 1
        self._running_at[batch[0].call.priority] -= 1
        try:
            if error is None and (results is None or len(results) != len(batch)):
                error = RuntimeError(
                    f"{self.name}: {0 if results is None else len(results)} results for a batch of {len(batch)}"
                )
            if error is not None:
                log.error("%s batch of %d failed", self.name, len(batch), exc_info=error)
                self._fail(batch, error)
                return
            assert results is not None
            compute = time.monotonic() - start
            tokens = sum(len(p.ids) for p in batch)
            per_token = compute / max(1, sharing) / tokens
            self._seconds_per_token += (
                0.2 * (per_token - self._seconds_per_token) if self._seconds_per_token else per_token
            )
            self._compute_seconds.observe(compute)
            self._token_count.inc(tokens)
            for p, r in zip(batch, results, strict=True):
                call = p.call
                if call.future.done():  # its caller went away, or another of its batches failed
                    continue
                call.results[p.index] = r
                call.compute_seconds = max(call.compute_seconds, compute)
                call.left -= 1
                if not call.left:
                    call.future.set_result(None)
        finally:
            if self.depth or self._closed:  # a slot is free for what waits (or for the collector to end)
                self._wake.set()
            if not self._in_flight and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
