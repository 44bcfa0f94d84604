"""What the server does with a validated request: tokenize, batch, run, and shape the answer.

Between the transport (``servicer``) and the runtime: it owns one batcher per single-pass
graph, the threads their batches run on, and the thread that tokenizes large inputs.
Plain Python and numpy types in and out.

The work a request can bring is bounded before it is done. A text longer than the model's
context can hold is known to be so from its length alone (a token stands for at most
``max_token_bytes`` bytes): with truncation only a prefix of it is tokenized, without it is
refused untokenized. Requests with more than a little text are tokenized on a thread of their
own, so the event loop, and with it every health check, goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from service.batcher import Batcher, BatchLimits, BatchThreads
from service.config import NORMAL
from service.errors import InvalidInput
from service.metrics import Metrics
from service.runtime import Runtime, pad_right, usable_cores
from service.tokens import TextTokenizer

log = logging.getLogger(__name__)

# Which end of a text over the model's context is dropped to fit it; None: the text is refused.
Cut = Literal["end", "start"] | None

# Requests with less text than this are tokenized on the event loop: the hop to a thread would cost
# more than tokenizing it (2 KiB on one core: ~0.14 ms ASCII, ~0.6 ms other text). Longer ones go to
# the tokenizer's thread.
INLINE_CHARS = 2048


def yield_to_the_event_loop(nice: int) -> None:
    """Lower the calling thread's scheduling priority by ``nice`` (Linux: a thread's own nice value).

    Batches run on these threads; the event loop parses, refuses, answers and probes on its own.
    Where they share a core, an equal share gives the loop a few milliseconds at a time while a
    batch runs, and a refusal or a health check waits that long; with the batch threads below it,
    the loop runs as soon as it has work, and the model still gets every cycle the loop leaves."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except (OSError, AttributeError):  # not Linux, or not allowed: run at the same priority
            log.debug("could not lower the batch thread's priority", exc_info=True)


def prefix_for(text: str, chars: int) -> str:
    """A prefix of at least chars // 2 characters ending before a whitespace character, so that every
    word in it is whole and tokenizes as in the full text; the whole text where there is no such place."""
    for i in range(min(chars, len(text) - 1), chars // 2, -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return text[:i]
    return text


def suffix_for(text: str, chars: int) -> str:
    """A suffix of at most chars and at least chars // 2 characters beginning with whitespace that
    follows a word, so that every word in it is whole and tokenizes as in the full text, the space
    before it included (a byte-level BPE joins a word to the space before it); the whole text where
    there is no such place."""
    for i in range(max(1, len(text) - chars), len(text) - chars // 2):
        if text[i].isspace() and not text[i - 1].isspace():
            return text[i:]
    return text


@dataclass
class Embedded:
    vectors: np.ndarray  # (N, d) float32
    token_counts: list[int]
    queue_seconds: float
    compute_seconds: float


@dataclass
class AttentionMap:
    probs: np.ndarray  # (layers, heads, T, T) float32
    queue_seconds: float
    compute_seconds: float


class Engine:
    def __init__(self, runtime: Runtime, limits: BatchLimits, metrics: Metrics, batch_nice: int = 0) -> None:
        self.runtime = runtime
        # A second batch beside a running one helps only on a core of its own: on the same core it
        # time-slices with the first and both run slower (server on one core, 8 texts a request:
        # 626 -> 655 texts/s with one batch in flight).
        cores = usable_cores()
        if limits.max_in_flight > cores:
            log.info("%d batches in flight at most: this process may run on %d core(s)", cores, cores)
            limits = replace(limits, max_in_flight=cores)
        self.limits = limits
        self.metrics = metrics
        # a thread for every batch that may be in flight, in each batcher
        self.encode_threads, self.attention_threads = (
            BatchThreads(limits.max_in_flight, f"attnserve-{graph}", yield_to_the_event_loop, (batch_nice,))
            for graph in ("encode", "attention")
        )
        max_len = runtime.info.max_seq_len
        self.encoder = Batcher("encode", self._run_encode, limits, self.encode_threads, metrics, max_len)
        self.attender = Batcher("attention", self._run_attention, limits, self.attention_threads, metrics, max_len)
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnserve-tokenize")
        tok = runtime.tokenizer
        self.token_ids = TextTokenizer(tok)
        self.token_text = runtime.token_text
        max_token_bytes = max(len(s) for s in tok.get_vocab())  # byte-level: one character a byte
        # a text of more characters than this has more tokens than the context holds, and its first
        # max_seq_len tokens are those of a prefix of (at least) half as many characters
        self.cut_chars = 2 * max_len * max_token_bytes

    def start(self) -> None:
        self.encoder.start()
        self.attender.start()

    async def stop(self) -> None:
        await asyncio.gather(self.encoder.stop(), self.attender.stop())
        self.encode_threads.shutdown()
        self.attention_threads.shutdown()
        self.tokenizer_pool.shutdown(wait=True)

    # --- batch runners (batch threads) ----------------------------------------------------

    def _run_encode(self, batch: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = self.runtime.encode(*pad_right(batch))
        return [(out.pooled_mean[i], out.pooled_last[i]) for i in range(len(batch))]

    def _run_attention(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        probs = self.runtime.attention(*pad_right(batch))  # (B, L, nh, T, T)
        return [np.ascontiguousarray(probs[i, :, :, : len(x), : len(x)]) for i, x in enumerate(batch)]

    # --- requests ----------------------------------------------------------------------------

    async def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text: on the event loop for a little text, on the tokenizer's thread otherwise."""
        if sum(len(t) for t in texts) <= INLINE_CHARS:
            return self.token_ids(texts)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, self.token_ids, list(texts))

    async def fit(
        self,
        texts: Sequence[str],
        cut: Cut,
        fields: Sequence[str],
        keep: int | None = None,
        hint: str = "set truncation to TRUNCATION_END or TRUNCATION_START",
    ) -> list[tuple[list[int], bool]]:
        """Each text's ids, at most ``keep`` of them (the model's context by default), and whether
        they were cut to fit: at their end (``cut`` "end") or their start ("start"). InvalidInput,
        naming the field and what to do (``hint``), for a text over the context with no ``cut``."""
        limit = self.runtime.info.max_seq_len
        keep = limit if keep is None else keep
        prepared = []
        for text, name in zip(texts, fields, strict=True):
            if len(text) > self.cut_chars:  # certainly longer than the context: tokenize only what can be kept
                if cut is None:
                    raise InvalidInput(
                        f"{name}: {len(text)} characters are more than the model's context of {limit} tokens can "
                        f"hold; shorten it or {hint}"
                    )
                text = prefix_for(text, self.cut_chars) if cut == "end" else suffix_for(text, self.cut_chars)
            prepared.append(text)
        fitted = []
        for ids, name in zip(await self.tokenize(prepared), fields, strict=True):
            if len(ids) <= keep:
                fitted.append((ids, False))
            elif cut == "end":
                fitted.append((ids[:keep], True))
            elif cut == "start":
                fitted.append((ids[len(ids) - keep :], True))
            else:
                raise InvalidInput(
                    f"{name}: {len(ids)} tokens exceed the model's context of {limit}; shorten it or {hint}"
                )
        return fitted

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        table = self.token_text
        return [table[i] for i in ids]

    async def encode(
        self,
        ids: Sequence[Sequence[int]],
        pooling: Literal["mean", "last"],
        normalize: bool,
        deadline: float | None,
        priority: int = NORMAL,
    ) -> Embedded:
        items = self.encoder.enqueue([np.asarray(x, np.int64) for x in ids], deadline, priority)  # all, or none
        results = await self.encoder.wait(items)
        which = 0 if pooling == "mean" else 1
        vectors = np.stack([r.value[which] for r in results]).astype(np.float32)
        if normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return Embedded(
            vectors,
            [len(x) for x in ids],
            max(r.queue_seconds for r in results),
            max(r.compute_seconds for r in results),
        )

    async def attention(
        self,
        ids: Sequence[int],
        layers: Sequence[int],
        heads: Sequence[int],
        deadline: float | None,
        priority: int = NORMAL,
    ) -> AttentionMap:
        r = await self.attender.submit(np.asarray(ids, np.int64), deadline, priority)
        probs = r.value[np.ix_(list(layers), list(heads))]  # (len(layers), len(heads), T, T)
        return AttentionMap(probs, r.queue_seconds, r.compute_seconds)
