"""Generation with iteration-level scheduling (as in Orca, TGI and vLLM) on the decoder graph.

One loop owns the running batch. Each iteration:

1. drops sequences whose caller cancelled or whose deadline passed, freeing their slots;
2. admits waiting requests into free cache slots, within ``max_running`` sequences and
   ``max_cached_tokens`` (each admitted sequence reserves prompt + max_new_tokens), and
   prefills them in a batch of their own;
3. runs one decode step for every running sequence together;
4. samples each sequence's next token with its own random generator, hands it to the caller,
   and retires finished sequences at once.

So a request joins between two steps and never waits for the batch to drain, and a caller
who goes away stops costing compute within one step. Slots are taken lowest first and each
step runs only the slots up to the highest one in use.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from service.errors import DeadlineExceeded, ModelNotReady, Overloaded
from service.metrics import Metrics
from service.runtime import DeviceKVCache, Runtime
from service.sampling import SamplingParams, choose, log_softmax

log = logging.getLogger(__name__)


class Finish(Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_TEXT = "end_of_text"
    CONTEXT_FULL = "context_full"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationLimits:
    max_running: int = 16  # sequences decoded together (cache slots)
    max_cached_tokens: int = 16 * 256  # prompt + max_new_tokens reserved by every running sequence, summed
    max_waiting: int = 64  # beyond this, RESOURCE_EXHAUSTED at once
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if min(self.max_running, self.max_cached_tokens, self.max_waiting, self.max_new_tokens) < 1:
            raise ValueError(f"generation limits must be positive: {self}")


@dataclass
class Token:
    """One generated token, as handed to the caller."""

    id: int
    text: str  # the text it completes (may be "" while a character or a possible stop sequence is incomplete)
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Done:
    finish: Finish
    text: str  # the whole generated text, stop sequence removed
    prompt_tokens: int
    generated_tokens: int
    queue_seconds: float
    time_to_first_token: float


Event = Token | Done


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    deadline: float | None
    events: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the generated text already handed out
    cancelled: bool = False
    last_logits: np.ndarray | None = None

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens


class Scheduler:
    def __init__(self, runtime: Runtime, limits: GenerationLimits, metrics: Metrics) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        self.cache = runtime.new_cache(limits.max_running)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnserve-decode")
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.eot = runtime.info.eot_token_id
        self.max_len = runtime.info.max_seq_len

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Refuse new requests, finish the ones admitted or waiting, then end the loop."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)

    # --- callers -------------------------------------------------------------------------------

    async def generate(self, prompt: list[int], params: SamplingParams, deadline: float | None) -> AsyncIterator[Event]:
        """Tokens as they come, then one ``Done``. Leaving the iteration early cancels the sequence."""
        if self._closed:
            raise ModelNotReady("server is shutting down")
        if len(self.waiting) >= self.limits.max_waiting:
            raise Overloaded(f"generation queue is full ({self.limits.max_waiting} waiting); retry later")
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().generate_state(1)[0])
        seq = Sequence(next(self._ids), prompt, params, np.random.default_rng(seed), deadline)
        self.waiting.append(seq)
        self.metrics.gen_waiting.set(len(self.waiting))
        self._wake.set()
        try:
            while True:
                event = await seq.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Done):
                    return
        finally:
            seq.cancelled = True  # no-op once done; otherwise the loop drops it before the next step
            self._wake.set()

    # --- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_gone()
            admitted = self._admit()
            if admitted:
                await loop.run_in_executor(self.executor, self._prefill, admitted)
                for seq in admitted:
                    self._advance(seq)
            if self.running:
                k = max(self.running) + 1
                await loop.run_in_executor(self.executor, self._step, k)
                for slot in sorted(self.running):
                    self._advance(self.running[slot])
            elif not self.waiting:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()

    def _drop_gone(self) -> None:
        now = time.monotonic()
        for seq in list(self.waiting):
            if seq.cancelled or (seq.deadline is not None and now >= seq.deadline):
                self.waiting.remove(seq)
                self._end(
                    seq,
                    Finish.CANCELLED,
                    DeadlineExceeded("deadline passed before generation began") if not seq.cancelled else None,
                )
        for seq in list(self.running.values()):
            if seq.cancelled or (seq.deadline is not None and now >= seq.deadline):
                self._retire(
                    seq,
                    Finish.CANCELLED,
                    DeadlineExceeded("deadline passed during generation") if not seq.cancelled else None,
                )
        self.metrics.gen_waiting.set(len(self.waiting))

    def _admit(self) -> list[Sequence]:
        admitted = []
        reserved = sum(s.reserved for s in self.running.values())
        while self.waiting and len(self.running) < self.limits.max_running:
            seq = self.waiting[0]
            if reserved + seq.reserved > self.limits.max_cached_tokens and self.running:
                break  # wait for room; a lone sequence is always let in
            self.waiting.popleft()
            seq.slot = next(s for s in range(self.limits.max_running) if s not in self.running)
            seq.admitted_at = time.monotonic()
            self.running[seq.slot] = seq
            reserved += seq.reserved
            admitted.append(seq)
            self.metrics.gen_queue_seconds.observe(seq.admitted_at - seq.enqueued_at)
            self.metrics.gen_prompt_tokens.inc(len(seq.prompt))
        self.metrics.gen_waiting.set(len(self.waiting))
        self.metrics.gen_running.set(len(self.running))
        return admitted

    # executor thread: model calls only; the event loop thread does everything else
    def _prefill(self, seqs: list[Sequence]) -> None:
        logits = self.runtime.prefill(self.cache, [s.slot for s in seqs], [s.prompt for s in seqs])
        for seq, row in zip(seqs, logits, strict=True):
            seq.last_logits = row

    def _step(self, k: int) -> None:
        rows = self.cache.slots if isinstance(self.cache, DeviceKVCache) else k
        ids = np.zeros((rows, 1), np.int64)
        mask = np.zeros((rows, 1), np.int64)
        stepping = [s for s in self.running.values() if s.generated]
        for seq in stepping:
            ids[seq.slot, 0] = seq.generated[-1]
            mask[seq.slot, 0] = 1
        logits = self.runtime.decode_step(self.cache, ids, mask)[:, 0]  # (rows, V)
        for seq in stepping:
            seq.last_logits = logits[seq.slot]
        self.metrics.gen_batch_size.observe(len(stepping))

    def _advance(self, seq: Sequence) -> None:
        """Sample the sequence's next token from its last logits, hand it over, and retire it if done."""
        if seq.last_logits is None or seq.slot < 0:
            return
        logits, seq.last_logits = seq.last_logits, None
        p = seq.params
        token = choose(logits, p, np.asarray(seq.prompt + seq.generated), seq.rng)
        now = time.monotonic()
        if not seq.generated:
            seq.first_token_at = now
            self.metrics.gen_ttft_seconds.observe(now - seq.enqueued_at)
        else:
            self.metrics.gen_itl_seconds.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.gen_generated_tokens.inc()
        if token == self.eot:
            self._retire(seq, Finish.END_OF_TEXT)
            return
        seq.generated.append(token)
        text = self._text(seq)
        stop_at = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        lp = log_softmax(logits) if p.logprobs else None
        if stop_at >= 0:
            self._emit(seq, token, text[:stop_at], lp, final=True)
            self._retire(seq, Finish.STOP)
            return
        self._emit(seq, token, text, lp)
        if len(seq.generated) >= p.max_new_tokens:
            self._retire(seq, Finish.LENGTH)
        elif len(seq.prompt) + len(seq.generated) >= self.max_len:
            self._retire(seq, Finish.CONTEXT_FULL)

    def _text(self, seq: Sequence) -> str:
        return self.runtime.tokenizer.decode(seq.generated, skip_special_tokens=False)

    def _emit(self, seq: Sequence, token: int, text: str, lp: np.ndarray | None, final: bool = False) -> None:
        """Hand out the text that is settled: not a half-decoded character, not a possible start of a stop sequence."""
        settled = len(text)
        if not final:
            if text.endswith("\ufffd"):
                settled = len(text.rstrip("\ufffd"))
            for s in seq.params.stop:
                for n in range(min(len(s) - 1, settled), 0, -1):
                    if text[:settled].endswith(s[:n]):
                        settled -= n
                        break
        delta = text[seq.emitted : max(settled, seq.emitted)]
        seq.emitted = max(settled, seq.emitted)
        tok = Token(token, delta)
        if lp is not None:
            tok.logprob = float(lp[token])
            if seq.params.top_logprobs:
                top = np.argpartition(-lp, seq.params.top_logprobs)[: seq.params.top_logprobs]
                tok.top = [(int(i), float(lp[i])) for i in top[np.argsort(-lp[top])]]
        seq.events.put_nowait(tok)

    def _retire(self, seq: Sequence, finish: Finish, error: BaseException | None = None) -> None:
        self.running.pop(seq.slot, None)
        self.cache.free(seq.slot)
        self.metrics.gen_running.set(len(self.running))
        self._end(seq, finish, error)
        seq.slot = -1

    def _end(self, seq: Sequence, finish: Finish, error: BaseException | None = None) -> None:
        self.metrics.gen_finished.labels(finish.value).inc()
        now = time.monotonic()
        self.metrics.gen_e2e_seconds.observe(now - seq.enqueued_at)
        if error is not None:
            seq.events.put_nowait(error)
            return
        text = self._text(seq)
        if finish is Finish.STOP:
            text = text[: min(i for i in (text.find(s) for s in seq.params.stop) if i >= 0)]
        if seq.emitted < len(text):  # what was held back as a possible stop sequence start
            seq.events.put_nowait(Token(-1, text[seq.emitted :]))
            seq.emitted = len(text)
        seq.events.put_nowait(
            Done(
                finish,
                text,
                len(seq.prompt),
                len(seq.generated),
                (seq.admitted_at or now) - seq.enqueued_at,
                (seq.first_token_at - seq.enqueued_at) if seq.first_token_at else 0.0,
            )
        )
