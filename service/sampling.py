"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

Plain numpy over one sequence's logits, with the sequence's own random generator, so a
seeded request gives the same text whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    repetition_penalty: float = 1.0  # 1 = none (CTRL, Keskar et al. 2019)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def problems(self, max_new_tokens: int) -> list[str]:
        """What is wrong with these parameters, field by field (empty when they are fine)."""
        bad = []
        if not 1 <= self.max_new_tokens <= max_new_tokens:
            bad.append(f"max_new_tokens: {self.max_new_tokens} is not in 1..{max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad.append(f"temperature: {self.temperature} must be a finite number >= 0")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            bad.append(f"top_p: {self.top_p} must be in (0, 1]")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad.append(f"repetition_penalty: {self.repetition_penalty} must be a finite number > 0")
        if self.top_logprobs > 20:
            bad.append(f"top_logprobs: {self.top_logprobs} exceeds 20")
        if any(not s for s in self.stop):
            bad.append("stop: sequences must not be empty")
        if len(self.stop) > 8:
            bad.append(f"stop: {len(self.stop)} sequences exceed 8")
        return bad


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - math.log(float(np.exp(x - m).sum()))


def choose(logits: np.ndarray, params: SamplingParams, seen: np.ndarray, rng: np.random.Generator) -> int:
    """The next token. logits (V,); seen: ids already in the sequence (for the repetition penalty)."""
    z = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and len(seen):
        ids = np.unique(seen)
        vals = z[ids]
        z[ids] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(z))
    z = z / params.temperature
    if 0 < params.top_k < len(z):
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]  # the smallest set reaching top_p
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))
