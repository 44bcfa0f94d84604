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
who goes away stops costing compute within one step.

A request is refused at once, before its prompt is tokenized, when ``max_waiting`` wait already,
or when it would wait for a slot and that wait and its own run, estimated from running averages
of the sequences that ended before it, would take more than ``DEADLINE_HEADROOM`` of the time
left before its deadline: under overload, what is accepted finishes in time, and what could not
is refused while it can still go elsewhere, rather than expiring in the queue or part-way through.

Whatever fails in an iteration fails the sequences it was working on, and the loop goes on:
a model step or a prefill fails its own sequences, handing one sequence its token fails that
sequence, and anything else fails every sequence then known. Should the loop end all the same,
every waiting caller gets an error, later calls are refused, and ``on_death`` tells the server
(which then reports NOT_SERVING). Slots are taken lowest first and each
step runs only the slots up to the highest one in use.

The loop runs in a thread of its own, not on the event loop: model steps, sampling and
bookkeeping follow each other there without a hop between threads, while the event loop
writes the previous step's tokens to the network. Each step's tokens cross to the event
loop in one call, through ``Handoff`` (an eventfd rather than the loop's self-pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from service import tracing
from service.batcher import DEADLINE_HEADROOM
from service.config import LOW, NORMAL, PRIORITIES
from service.errors import (
    GENERATION_UNAVAILABLE,
    QUEUE_TOO_LONG,
    SHUTTING_DOWN,
    DeadlineExceeded,
    ModelNotReady,
    Overloaded,
)
from service.handoff import Handoff
from service.logs import CLIENT
from service.metrics import Metrics
from service.runtime import DeviceKVCache, Runtime
from service.sampling import SamplingParams, Uniform, choose, choose_batch, log_softmax

log = logging.getLogger(__name__)


class Finish(Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_TEXT = "end_of_text"
    CONTEXT_FULL = "context_full"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"  # the caller's deadline passed: it gets DEADLINE_EXCEEDED, not a finish reason
    ERROR = "error"  # the step failed: the caller gets an error, not a finish reason


@dataclass(frozen=True)
class GenerationLimits:
    max_running: int = 16  # sequences decoded together (cache slots)
    max_cached_tokens: int = 16 * 256  # prompt + max_new_tokens reserved by every running sequence, summed
    max_waiting: int = 64  # beyond this, RESOURCE_EXHAUSTED at once
    max_new_tokens: int = 256
    # tokens a stream message gathers before it is sent (the last message carries what is left): 1 sends
    # each token as it comes; more trade a few steps of latency for less work per token under load
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if min(self.max_running, self.max_cached_tokens, self.max_waiting, self.max_new_tokens) < 1:
            raise ValueError(f"generation limits must be positive: {self}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")


@dataclass
class Token:
    """One generated token, as handed to the caller."""

    id: int
    text: str  # the text it completes (may be "" while a character or a possible stop sequence is incomplete)
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    # with return_attention: per layer, the sequence positions the step that chose this token
    # attended to most (averaged over heads), most attended first, and their weights
    attention: list[tuple[int, list[int], list[float]]] = field(default_factory=list)


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
    rng: Uniform
    deadline: float | None
    # what the loop has handed over and the caller has not yet taken (event loop thread only), and
    # the future the caller waits on while there is nothing: one wake-up a step, not one an event
    inbox: list[Event | BaseException] = field(default_factory=list)
    waiter: asyncio.Future[None] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the generated text already handed out
    settled_text: str = ""  # the text of generated[:settled_tokens], which ends on a whole character
    settled_tokens: int = 0
    cancelled: bool = False
    interval: int = 1  # tokens held before they are handed over; 0: all of them, at the end (a unary call)
    held: list[Token] = field(default_factory=list)
    client: str | None = None  # the name of its call's API key, its tokens counted under it as it ends
    priority: int = NORMAL  # (an index of PRIORITIES) a free slot goes to the highest waiting, the first of it
    exemplar: dict[str, str] | None = None  # its call's span's ids, where sampled: its first token's exemplar

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def seen(self) -> list[int]:
        """The ids a repetition penalty reads (none without one): the prompt and what was generated."""
        return self.prompt + self.generated if self.params.repetition_penalty != 1.0 else []


S = TypeVar("S", bound=Sequence)

# a sequence, its next token, its log-probabilities, and what the step attended to (layers, positions)
Pick = tuple[Sequence, int, "np.ndarray | None", "np.ndarray | None"]


class Scheduler:
    def __init__(self, runtime: Runtime, limits: GenerationLimits, metrics: Metrics) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        self.cache = runtime.new_cache(limits.max_running)
        # shared with callers: under _lock. By priority, highest first, then in order of arrival
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence; the loop thread's own
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._handoff: Handoff | None = None  # the loop's events and on_death, onto the event loop
        self._outbox: list[tuple[Sequence, Event | BaseException]] = []  # this step's events, sent together
        self._closed = False
        self.dead = False  # the loop ended other than by stop(): nothing more can be generated
        self.on_death: Callable[[], None] | None = None  # called on the event loop when that happens
        self.eot = runtime.info.eot_token_id
        self.max_len = runtime.info.max_seq_len
        self.token_text = runtime.token_text
        # what admission estimates from, from the sequences that ended as they should (the loop writes
        # them, callers read them; 0 until the first): a running sequence's seconds a token, and the
        # tokens a sequence generates before it ends (running averages)
        self._seconds_per_token = 0.0
        self._tokens_per_sequence = 0.0
        self._queue_seconds = [metrics.gen_queue_seconds.labels(p) for p in PRIORITIES]

    def start(self) -> None:
        self._handoff = Handoff(asyncio.get_running_loop())
        self._thread = threading.Thread(target=self._run, name="attnserve-scheduler", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Refuse new requests, finish the ones admitted or waiting, then end the loop."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._handoff is not None:
            self._handoff.close()  # hands over what the loop's last step left

    # --- callers (event loop thread) -------------------------------------------------------------

    def admit(self, deadline: float | None = None, max_new_tokens: int = 1, priority: int = NORMAL) -> None:
        """Refuse at once, before the prompt is tokenized, what could not be queued now, or what
        would wait so long for a slot (behind those waiting at its ``priority`` and above) that it
        could not be done before its deadline."""
        if self.dead:
            raise ModelNotReady(
                "generation is unavailable on this server; retry on another replica", GENERATION_UNAVAILABLE
            )
        if self._closed:
            raise ModelNotReady("server is shutting down", SHUTTING_DOWN)
        if len(self.waiting) >= self.limits.max_waiting and not self._below(priority):
            raise Overloaded(f"generation queue is full ({self.limits.max_waiting} waiting); retry later")
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the deadline had passed when the request arrived")
        done_in = self.expected_seconds(max_new_tokens, priority)
        if done_in is not None and done_in > DEADLINE_HEADROOM * left:
            raise Overloaded(
                f"generation: a sequence arriving now would be done in about {done_in:.3f}s, too near the "
                f"{left:.3f}s left before the deadline; retry later or elsewhere",
                QUEUE_TOO_LONG,
            )

    def expected_seconds(self, max_new_tokens: int, priority: int = LOW) -> float | None:
        """Seconds until a sequence of up to ``max_new_tokens`` tokens, arriving now at ``priority``,
        would be done: its wait for a slot, behind those waiting at its priority and above, then its
        own run (an estimate). None when a slot would be free for it (those waiting take the free ones
        first): a call is then let try whatever its deadline, as on an idle server, and a burst that
        the loop has not yet let in is not taken for a queue."""
        if priority == LOW or not self.waiting:
            waiting = len(self.waiting)
        else:
            with self._lock:
                waiting = sum(1 for s in self.waiting if s.priority <= priority)
        running = len(self.running)
        free = self.limits.max_running - running
        if waiting < free:
            return None
        per_token, tokens = self._seconds_per_token, self._tokens_per_sequence
        # with the slots full, a running sequence ends about every per_token * tokens / running
        # seconds; those waiting beyond the free slots take the slots they leave, this one the next
        sharing = running or self.limits.max_running
        wait = (waiting - free + 1) * per_token * tokens / sharing
        return wait + per_token * min(max_new_tokens, tokens)

    async def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        deadline: float | None,
        stream: bool = True,
        priority: int = NORMAL,
    ) -> AsyncIterator[list[Event]]:
        """Events as they come, in groups: whatever is ready when the caller asks (``stream_interval``
        tokens at a time, more when it lags), the last group ending with one ``Done``. Without ``stream``
        the tokens are held and handed over with the ``Done``, which costs the event loop one wake-up
        rather than one a token. Leaving early cancels the sequence. It waits for a slot behind those
        of its ``priority`` and above that came before it, ahead of any below."""
        self.admit(priority=priority)
        seq = self._sequence(Sequence, prompt, params, deadline, stream)
        seq.priority = priority
        self._enqueue(seq)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not seq.inbox:
                    seq.waiter = loop.create_future()
                    try:
                        await seq.waiter
                    finally:
                        seq.waiter = None
                group, seq.inbox = seq.inbox, []
                for event in group:
                    if isinstance(event, BaseException):
                        raise event
                yield group  # type: ignore[misc]
                if isinstance(group[-1], Done):
                    return
        finally:
            seq.cancelled = True  # no-op once done; otherwise the loop drops it before the next step
            self._wake.set()

    def _sequence(
        self, kind: type[S], prompt: list[int], params: SamplingParams, deadline: float | None, stream: bool
    ) -> S:
        rng = random.Random(params.seed)  # None: seeded from the system's entropy
        seq = kind(next(self._ids), prompt, params, rng, deadline)
        seq.interval = self.limits.stream_interval if stream else 0
        seq.client = CLIENT.get()  # (the caller's task's: the call's client, with API keys)
        seq.exemplar = tracing.exemplar()  # (likewise: its span's ids, where chosen as it started)
        return seq

    def _below(self, priority: int) -> bool:
        """Whether a sequence of a lower priority than ``priority`` waits (one whose place it may take)."""
        with self._lock:
            return bool(self.waiting) and self.waiting[-1].priority > priority

    def _enqueue(self, seq: Sequence) -> None:
        """Queue ``seq`` behind those of its priority and above; where the queue is full, in the place
        of the sequence of a lower priority that came last (refused as a full queue refuses, so that a
        flood of low work cannot keep out higher), else refused."""
        displaced = None
        with self._lock:
            waiting = self.waiting
            if len(waiting) >= self.limits.max_waiting:
                if not waiting or waiting[-1].priority <= seq.priority:
                    raise Overloaded(f"generation queue is full ({self.limits.max_waiting} waiting); retry later")
                displaced = waiting.pop()  # the lowest priority's latest
            at = len(waiting)
            while at and waiting[at - 1].priority > seq.priority:  # behind its own priority and those above
                at -= 1
            waiting.insert(at, seq)
            self.metrics.gen_waiting.set(len(waiting))
        if displaced is not None:  # (it never reached the loop's hands: told here, on the event loop)
            error = Overloaded("generation queue is full: displaced by work of a higher priority; retry later")
            self._deliver([(displaced, error)])
        self._wake.set()

    @staticmethod
    def _deliver(outbox: list[tuple[Sequence, Event | BaseException]]) -> None:
        for seq, event in outbox:
            seq.inbox.append(event)
            if seq.waiter is not None and not seq.waiter.done():
                seq.waiter.set_result(None)

    # --- the loop (its own thread) -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    idle = self._iterate()
                except Exception:
                    log.exception("generation loop iteration failed; failing its sequences")
                    self._fail_all(RuntimeError("generation failed"))
                    idle = False
                self._flush()
                if idle:
                    if self._closed:
                        return
                    self._wake.wait()
        except BaseException:
            log.critical("the generation loop died", exc_info=True)
            raise
        finally:
            if not (self._closed and not self.running and not self.waiting):
                self._die()

    def _iterate(self) -> bool:
        """One iteration; whether the loop is idle."""
        with self._lock:
            self._drop_gone()
            admitted = self._admit()
            idle = not self.running and not self.waiting
            if idle:
                self._wake.clear()
        if admitted:
            self._guarded(self._prefill, admitted, admitted)
        if self.running:
            self._guarded(self._step, list(self.running.values()), max(self.running) + 1)
        return idle

    def _fail_all(self, error: BaseException) -> None:
        """Fail every sequence, running or waiting (after a failure that names none of them)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for seq in list(self.running.values()):
            with contextlib.suppress(Exception):
                self._retire(seq, Finish.ERROR, error)
        for seq in waiting:
            with contextlib.suppress(Exception):
                self._end(seq, Finish.ERROR, error)
        self.running.clear()

    def _die(self) -> None:
        self.dead = True
        with contextlib.suppress(BaseException):
            self._fail_all(
                ModelNotReady("generation stopped on this server; retry on another replica", GENERATION_UNAVAILABLE)
            )
            self._flush()
            if self._handoff is not None and self.on_death is not None:
                self._handoff.call(self.on_death)

    def _guarded(self, work: Callable[[Any], list[Pick]], involved: list[Sequence], arg: Any) -> None:
        """Run a prefill or a step; if it fails, its sequences fail (INTERNAL) and the loop goes on."""
        try:
            picks = work(arg)
        except Exception:
            log.exception("generation step failed for %d sequences", len(involved))
            for seq in involved:
                if seq.slot >= 0:
                    self._retire(seq, Finish.ERROR, RuntimeError("generation step failed"))
            return
        self._accept_all(picks)

    def _flush(self) -> None:
        if self._outbox and self._handoff is not None:
            outbox, self._outbox = self._outbox, []
            self._handoff.call(self._deliver, outbox)

    def _drop_gone(self) -> None:
        now = time.monotonic()
        gone = [seq for seq in self.waiting if seq.cancelled or (seq.deadline is not None and now >= seq.deadline)]
        for seq in gone:
            self.waiting.remove(seq)
            if seq.cancelled:
                self._end(seq, Finish.CANCELLED)
            else:
                self._end(seq, Finish.DEADLINE, DeadlineExceeded("deadline passed before generation began"))
        if gone:
            self.metrics.gen_waiting.set(len(self.waiting))
        for seq in list(self.running.values()):
            if seq.cancelled or (seq.deadline is not None and now >= seq.deadline):
                if seq.cancelled:
                    self._retire(seq, Finish.CANCELLED)
                else:
                    self._retire(seq, Finish.DEADLINE, DeadlineExceeded("deadline passed during generation"))

    def _admit(self) -> list[Sequence]:
        if not self.waiting:  # the common case between steps: nothing to do, no gauge changes
            return []
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
            self._queue_seconds[seq.priority].observe(seq.admitted_at - seq.enqueued_at)
            self.metrics.gen_prompt_tokens.inc(len(seq.prompt))
        self.metrics.gen_waiting.set(len(self.waiting))
        self.metrics.gen_running.set(len(self.running))
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> list[Pick]:
        wanted = any(s.params.return_attention for s in seqs)
        logits, att = self.runtime.prefill(self.cache, [s.slot for s in seqs], [s.prompt for s in seqs], wanted)
        # per sequence: (layers, positions) averaged over heads, for those that asked
        maps: list[np.ndarray | None] = [None] * len(seqs)
        for i, (seq, a) in enumerate(zip(seqs, att or [], strict=False)):
            if seq.params.return_attention:
                maps[i] = a.mean(axis=1)
        return self._sample(seqs, logits, maps)

    def _step(self, k: int) -> list[Pick]:
        rows = self.cache.slots if isinstance(self.cache, DeviceKVCache) else k
        ids = np.zeros((rows, 1), np.int64)
        mask = np.zeros((rows, 1), np.int64)
        stepping: list[Sequence] = []
        slots: list[int] = []
        attention = False
        for seq in self.running.values():  # one pass: this runs every step
            if seq.generated:
                stepping.append(seq)
                slots.append(seq.slot)
                ids[seq.slot, 0] = seq.generated[-1]
                mask[seq.slot, 0] = 1
                attention = attention or seq.params.return_attention
        maps: list[np.ndarray | None] = [None] * len(stepping)
        if attention:
            out, att = self.runtime.decode_step_with_attention(self.cache, ids, mask)
            M = self.cache.max_len
            for i, seq in enumerate(stepping):
                if seq.params.return_attention:
                    a = att[seq.slot, :, :, 0].mean(axis=1)  # (layers, M + 1), averaged over heads
                    cached = int(self.cache.lengths[seq.slot]) - 1  # before this step's token was appended
                    maps[i] = np.concatenate((a[:, :cached], a[:, M : M + 1]), axis=1)  # (layers, positions)
        else:
            out = self.runtime.decode_step(self.cache, ids, mask)
        logits = out[:, 0]  # (rows, V)
        self.metrics.gen_batch_size.observe(len(stepping))
        # every row in slot order (one stream alone, or a full batch): the rows as they are, no copy
        rows_in_order = len(slots) == len(logits) and slots == list(range(len(slots)))
        return self._sample(stepping, logits if rows_in_order else logits[slots], maps)

    @staticmethod
    def _sample(seqs: list[Sequence], logits: np.ndarray, maps: list[np.ndarray | None]) -> list[Pick]:
        """Next tokens for seqs from their logits (len(seqs), V): in one pass over the batch where the
        sampling settings allow, one by one otherwise; each sequence draws from its own generator."""
        if len(seqs) == 1:  # one stream decoding, or one prefill: nothing to group, no lists to build
            seq, row, p = seqs[0], logits[0], seqs[0].params
            token = choose(row, p, seq.seen, seq.rng)
            return [(seq, token, log_softmax(row) if p.logprobs else None, maps[0])]
        tokens = choose_batch(
            logits,
            [s.params for s in seqs],
            [s.seen for s in seqs],
            [s.rng for s in seqs],
        )
        return [
            (seq, token, log_softmax(row) if seq.params.logprobs else None, amap)
            for seq, token, row, amap in zip(seqs, tokens, logits, maps, strict=True)
        ]

    def _accept_all(self, picks: list[Pick]) -> None:
        accepted = 0
        for seq, token, lp, amap in picks:
            if seq.slot >= 0 and not seq.cancelled:
                try:
                    self._accept(seq, token, lp, amap)
                except Exception:  # this sequence's own text or events: it fails, the others go on
                    log.exception("handing out a token failed")
                    if seq.slot >= 0:
                        self._retire(seq, Finish.ERROR, RuntimeError("generation failed"))
                accepted += 1
        self.metrics.gen_generated_tokens.inc(accepted)  # once a step, not once a token

    def _accept(self, seq: Sequence, token: int, lp: np.ndarray | None, amap: np.ndarray | None = None) -> None:
        """Take the sequence's next token: hand it over, and retire the sequence if it is done."""
        p = seq.params
        now = time.monotonic()
        if not seq.generated:
            seq.first_token_at = now
            self.metrics.gen_ttft_seconds.observe(now - seq.enqueued_at, seq.exemplar)
        else:
            self.metrics.gen_itl_seconds.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if token == self.eot:
            self._retire(seq, Finish.END_OF_TEXT)
            return
        seq.generated.append(token)
        text = self._text(seq)
        stop_at = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1) if p.stop else -1
        if stop_at >= 0:
            self._emit(seq, token, text[:stop_at], lp, amap, final=True)
            self._retire(seq, Finish.STOP)
            return
        self._emit(seq, token, text, lp, amap)
        if len(seq.generated) >= p.max_new_tokens:
            self._retire(seq, Finish.LENGTH)
        elif len(seq.prompt) + len(seq.generated) >= self.max_len:
            self._retire(seq, Finish.CONTEXT_FULL)

    def _text(self, seq: Sequence) -> str:
        """The generated text so far, decoding only the tokens since the last whole character.

        Byte-level tokens may split a character; text decoded up to a token that ends one is
        final, so only the tail after it is decoded again.
        """
        ids = seq.generated[seq.settled_tokens :]
        if len(ids) == 1 and ids[0] < len(self.token_text):  # the common case: one token, decoded once at start
            tail = self.token_text[ids[0]]
        else:
            tail = self.runtime.tokenizer.decode(ids, skip_special_tokens=False)
        if tail.endswith("\ufffd"):
            return seq.settled_text + tail
        seq.settled_text += tail
        seq.settled_tokens = len(seq.generated)
        return seq.settled_text

    def _emit(
        self,
        seq: Sequence,
        token: int,
        text: str,
        lp: np.ndarray | None,
        amap: np.ndarray | None = None,
        final: bool = False,
    ) -> None:
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
        if amap is not None:
            k = min(seq.params.attention_top_k, amap.shape[1])
            for layer, weights in enumerate(amap):
                best = np.argsort(-weights, kind="stable")[:k]
                tok.attention.append((layer, best.tolist(), weights[best].astype(float).tolist()))
        seq.held.append(tok)
        if seq.interval and len(seq.held) >= seq.interval:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Hand the held tokens to the caller."""
        self._outbox.extend((seq, t) for t in seq.held)
        seq.held.clear()

    def _retire(self, seq: Sequence, finish: Finish, error: BaseException | None = None) -> None:
        self.running.pop(seq.slot, None)
        self.cache.free(seq.slot)
        self.metrics.gen_running.set(len(self.running))
        if error is None and finish is not Finish.CANCELLED and seq.generated:
            self._learn(time.monotonic() - seq.admitted_at, len(seq.generated))
        self._end(seq, finish, error)
        seq.slot = -1

    def _learn(self, seconds: float, tokens: int) -> None:
        """Fold a sequence that ended as it should into the averages admission estimates from."""
        per_token = seconds / tokens
        if not self._tokens_per_sequence:
            self._seconds_per_token, self._tokens_per_sequence = per_token, float(tokens)
            return
        self._seconds_per_token += 0.1 * (per_token - self._seconds_per_token)
        self._tokens_per_sequence += 0.1 * (tokens - self._tokens_per_sequence)

    def _end(self, seq: Sequence, finish: Finish, error: BaseException | None = None) -> None:
        self._release(seq)
        self.metrics.gen_finished.labels(finish.value).inc()
        if (client := seq.client) is not None:  # its prompt where it was prefilled, and what it generated
            counts = self.metrics.tokens_by_client
            counts[client, "prompt"] = counts.get((client, "prompt"), 0) + (len(seq.prompt) if seq.admitted_at else 0)
            counts[client, "generated"] = counts.get((client, "generated"), 0) + len(seq.generated)
        now = time.monotonic()
        self.metrics.gen_e2e_seconds.observe(now - seq.enqueued_at)
        if error is not None:
            self._outbox.append((seq, error))
            return
        text = self._text(seq)
        if finish is Finish.STOP:
            text = text[: min(i for i in (text.find(s) for s in seq.params.stop) if i >= 0)]
        if seq.emitted < len(text):  # what was held back as a possible stop sequence start
            self._outbox.append((seq, Token(-1, text[seq.emitted :])))
            seq.emitted = len(text)
        done = Done(
            finish,
            text,
            len(seq.prompt),
            len(seq.generated),
            (seq.admitted_at or now) - seq.enqueued_at,
            (seq.first_token_at - seq.enqueued_at) if seq.first_token_at else 0.0,
        )
        self._outbox.append((seq, done))
