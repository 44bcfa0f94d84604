"""What the server does with a validated request: tokenize, batch, run, and shape the answer.

Between the transport (``servicer``) and the runtime: it owns one batcher per single-pass
graph and the executor their batches run in. Plain Python and numpy types in and out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.batcher import Batcher, BatchLimits
from service.metrics import Metrics
from service.runtime import Runtime, pad_right


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
    def __init__(self, runtime: Runtime, limits: BatchLimits, metrics: Metrics) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        # a worker for every batch that may be in flight, in either batcher
        self.executor = ThreadPoolExecutor(max_workers=2 * limits.max_in_flight, thread_name_prefix="attnserve-batch")
        max_len = runtime.info.max_seq_len
        self.encoder = Batcher("encode", self._run_encode, limits, self.executor, metrics, max_len)
        self.attender = Batcher("attention", self._run_attention, limits, self.executor, metrics, max_len)

    def start(self) -> None:
        self.encoder.start()
        self.attender.start()

    async def stop(self) -> None:
        await asyncio.gather(self.encoder.stop(), self.attender.stop())
        self.executor.shutdown(wait=True)

    # --- batch runners (executor threads) ----------------------------------------------------

    def _run_encode(self, batch: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = self.runtime.encode(*pad_right(batch))
        return [(out.pooled_mean[i], out.pooled_last[i]) for i in range(len(batch))]

    def _run_attention(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        probs = self.runtime.attention(*pad_right(batch))  # (B, L, nh, T, T)
        return [np.ascontiguousarray(probs[i, :, :, : len(x), : len(x)]) for i, x in enumerate(batch)]

    # --- requests ----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self.runtime.tokenizer
        if len(texts) == 1:  # encode_batch hands even one text to its thread pool, where it contends with the model
            return [tok.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.runtime.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    async def encode(
        self, ids: Sequence[Sequence[int]], pooling: Literal["mean", "last"], normalize: bool, deadline: float | None
    ) -> Embedded:
        self.encoder.reserve(len(ids))  # all of a request's texts are queued, or none
        results = await asyncio.gather(*(self.encoder.submit(np.asarray(x, np.int64), deadline) for x in ids))
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
        self, ids: Sequence[int], layers: Sequence[int], heads: Sequence[int], deadline: float | None
    ) -> AttentionMap:
        r = await self.attender.submit(np.asarray(ids, np.int64), deadline)
        probs = r.value[np.ix_(list(layers), list(heads))]  # (len(layers), len(heads), T, T)
        return AttentionMap(probs, r.queue_seconds, r.compute_seconds)
