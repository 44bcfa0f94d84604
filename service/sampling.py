"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

Plain numpy over one sequence's logits, with the sequence's own random generator, so a
seeded request gives the same text whatever else shares its batch. A generator is anything
with ``random()``: the scheduler gives each sequence a ``random.Random``, whose draw costs a
tenth of a numpy Generator's (it runs once a token).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MAX_STOP_SEQUENCES = 8


class Uniform(Protocol):
    """A random generator: ``random.Random`` or ``numpy.random.Generator``."""

    def random(self) -> float: ...


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
    return_attention: bool = False
    attention_top_k: int = 5

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
        if not 1 <= self.attention_top_k <= 64:
            bad.append(f"attention_top_k: {self.attention_top_k} is not in 1..64")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            bad.append(f"stop: {len(self.stop)} sequences exceed {MAX_STOP_SEQUENCES}")
        return bad


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def choose(logits: np.ndarray, params: SamplingParams, seen: Sequence[int] | np.ndarray, rng: Uniform) -> int:
    """The next token. logits (V,); seen: ids already in the sequence (read only for the repetition penalty)."""
    z = logits
    if params.repetition_penalty != 1.0 and len(seen):
        z = logits.astype(np.float64)
        ids = np.unique(seen)
        vals = z[ids]
        z[ids] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if params.temperature == 0:
        return int(np.argmax(z))
    if params.top_p >= 1.0:
        return sample_row(z, params.temperature, params.top_k, rng)
    idx = kept(z, params.top_k)
    z = (z if idx is None else z[idx]).astype(np.float64) / params.temperature
    top = z.max()
    if top in INFINITE:
        return outright(z) if idx is None else int(idx[outright(z)])
    p = np.exp(z - top)  # unnormalised: the draw below scales the uniform instead
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order]) / p.sum()
    keep = order[: int(np.searchsorted(cum, params.top_p) + 1)]  # the smallest set reaching top_p
    nucleus = np.zeros_like(p)
    nucleus[keep] = p[keep]
    token = draw(nucleus, rng)
    return token if idx is None else int(idx[token])


# Up to this many rows a step's rows are sampled one at a time: every numpy call costs
# microseconds whatever its size, and one row's 1-D path makes fewer calls than the batched one
# (1,024-token vocabulary, top-k 40: one row 32 us against 48; two rows already cost the same)
ROW_BY_ROW = 1


def kept(z: np.ndarray, top_k: int) -> np.ndarray | None:
    """Indices, ascending, of the top_k largest entries of one row z (V,); None where top_k keeps all.
    Ties at the k-th value are kept lowest index first; NaNs are never kept."""
    V = len(z)
    if not 0 < top_k < V:
        return None
    kth = np.partition(z, V - top_k)[V - top_k]
    idx = (z >= kth).nonzero()[0]  # the method, not np.flatnonzero: this runs every token
    if len(idx) != top_k:  # ties at the k-th value, or NaNs (which sort above every number)
        real = z[~np.isnan(z)]
        if not len(real):
            return idx
        kth = np.partition(real, max(len(real) - top_k, 0))[max(len(real) - top_k, 0)]
        above = np.flatnonzero(z > kth)
        idx = np.sort(np.concatenate((above, np.flatnonzero(z == kth)[: top_k - len(above)])))
    return idx


INFINITE = (np.inf, -np.inf)


def outright(w: np.ndarray) -> int:
    """The pick from weights whose largest is infinite (an fp16 logit that overflowed, say): the first
    +inf, which outweighs every finite logit, or where all are -inf and no distribution is left, the first."""
    return int(np.argmax(w))


def sample_row(z: np.ndarray, temperature: float, top_k: int, rng: Uniform) -> int:
    """A token from one row of logits z (V,) under temperature (> 0) and top-k (0 = all): the inverse
    CDF of the kept tokens' weights, in vocabulary order, at one uniform from rng."""
    idx = kept(z, top_k)
    w = (z if idx is None else z[idx]).astype(np.float64)
    if not len(w):  # nothing but NaNs
        return int(np.argmax(z))
    w /= temperature
    top = w.max()
    if top in INFINITE:
        pick = outright(w)
    else:
        w -= top
        np.exp(w, out=w)
        pick = _search_short(w, rng) if len(w) <= SHORT_ROW else _search(w, rng)
    return pick if idx is None else int(idx[pick])


def _search(w: np.ndarray, rng: Uniform) -> int:
    """The index where the running sum of weights w first exceeds one uniform scaled to their total."""
    w.cumsum(out=w)  # unnormalised: the uniform is scaled instead, as in draw()
    return min(int(np.count_nonzero(w <= rng.random() * w[-1])), len(w) - 1)


# Rows of at most this many weights are summed and searched in Python lists, not numpy arrays:
# after a model step the caches are cold and each numpy call costs microseconds, so a top-k of 40
# took 8 us less a token this way (one stream, in process).
SHORT_ROW = 64


def _search_short(w: np.ndarray, rng: Uniform) -> int:
    """``_search`` on a short row: the running sum added in order as cumsum adds it, so the pick is
    the one ``_search`` and ``sample_rows`` make for the same weights and uniform."""
    cum = list(itertools.accumulate(w.tolist()))
    u = rng.random() * cum[-1]
    if u != u:  # NaN (a NaN logit; infinite ones are picked before): no running sum is <= it, as count_nonzero counts
        return 0
    return min(bisect.bisect_right(cum, u), len(cum) - 1)  # sums <= u: cum never decreases


def kept_rows(z: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``kept`` for every row of z (n, V) at once: the kept indices and their logits, each (n, top_k);
    None where some row keeps more or fewer than top_k (ties at its k-th value, or NaNs)."""
    n, V = z.shape
    groups = 1 << max(4, (2 * top_k - 1).bit_length())  # a power of two, at least twice top_k
    if groups * 4 <= V:  # groups of four logits or more
        return _kept_rows_by_groups(z, top_k, groups)
    keep = z >= np.partition(z, V - top_k, axis=1)[:, V - top_k, None]
    flat = keep.reshape(-1).nonzero()[0]  # ascending: row by row, each row's in vocabulary order
    starts = np.arange(0, n * V, V)
    if len(flat) != n * top_k or (flat[::top_k] < starts).any() or (flat[top_k - 1 :: top_k] >= starts + V).any():
        return None
    return flat.reshape(n, top_k) - starts[:, None], z.reshape(-1).take(flat).reshape(n, top_k)


def _kept_rows_by_groups(z: np.ndarray, top_k: int, groups: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``kept_rows`` without a partition of every row: each row's logits dealt into ``groups`` groups
    (every groups-th logit), the k-th largest of the groups' maxima is at most the row's k-th largest
    (k groups hold a logit at least that large), so only the logits at or above it, a few more than k
    a row, are partitioned to find the k-th largest itself. The same indices and logits as the
    partition of the whole row (16 rows of 1,024, top-k 40: 54 us against 87 alone, 103 against 133
    in the scheduler, where the model leaves the caches cold)."""
    n, V = z.shape
    whole = V - V % groups  # the bound from the first ``whole`` logits of a row holds for the row
    dealt = (z if whole == V else z[:, :whole]).reshape(n, whole // groups, groups)
    bound = np.partition(dealt.max(axis=1), groups - top_k, axis=1)[:, groups - top_k, None]
    flat = (z >= bound).reshape(-1).nonzero()[0]  # ascending: row by row, each row's in vocabulary order
    values = z.reshape(-1).take(flat)
    rows = flat // V
    counts = np.bincount(rows, minlength=n)
    if counts.min() < top_k:  # NaNs among a row's largest groups: fewer real logits above the bound
        return None
    width = int(counts.max())
    padded = np.full((n, width), -np.inf, z.dtype)
    padded[rows, np.arange(len(flat)) - (counts.cumsum() - counts)[rows]] = values
    keep = values >= np.partition(padded, width - top_k, axis=1)[rows, width - top_k]
    if np.count_nonzero(keep) != n * top_k:  # every row has at least k: a row with more has ties
        return None
    return (flat[keep] % V).reshape(n, top_k), values[keep].reshape(n, top_k)


def sample_rows(z: np.ndarray, temperature: float, top_k: int, rngs: list[Uniform]) -> list[int]:
    """``sample_row`` for each row of logits z (n, V), under one temperature and top-k: the same
    arithmetic on the whole batch at once, so each row's token is the one it would get alone."""
    n, V = z.shape
    limited = 0 < top_k < V
    picked = kept_rows(z, top_k) if limited and n > ROW_BY_ROW else None
    if n <= ROW_BY_ROW or (limited and picked is None):
        return [sample_row(row, temperature, top_k, rng) for row, rng in zip(z, rngs, strict=True)]
    idx, kept_z = picked if picked is not None else (None, z)
    # in place on one float64 copy: this runs every decode step, and each numpy call costs microseconds
    cum = kept_z.astype(np.float64)
    cum /= temperature
    top = cum.max(axis=1, keepdims=True)
    if not np.isfinite(top).all():  # an infinite or NaN logit: those rows' own handling, row by row
        return [sample_row(row, temperature, top_k, rng) for row, rng in zip(z, rngs, strict=True)]
    cum -= top
    np.exp(cum, out=cum)
    cum.cumsum(axis=1, out=cum)
    u = np.array([r.random() for r in rngs]) * cum[:, -1]
    picks = np.minimum(np.count_nonzero(cum <= u[:, None], axis=1), kept_z.shape[1] - 1)
    return (picks if idx is None else idx[np.arange(n), picks]).tolist()  # type: ignore[no-any-return]


def draw(p: np.ndarray, rng: Uniform) -> int:
    """Inverse CDF of unnormalised weights p with one uniform from rng (cheaper than rng.choice)."""
    cum = np.cumsum(p)
    return min(int(np.count_nonzero(cum <= rng.random() * cum[-1])), len(p) - 1)


def choose_batch(
    logits: np.ndarray, params: list[SamplingParams], seen: list[list[int]], rngs: list[Uniform]
) -> list[int]:
    """``choose`` for each row of logits (n, V). Rows with the same temperature and top-k and no
    penalty or nucleus go through numpy together; each still draws one uniform from its own
    generator, so the tokens equal what ``choose`` would pick row by row. ``seen`` is read only for
    rows with a repetition penalty."""
    out: list[int | None] = [None] * len(params)
    groups: dict[tuple[float, int], list[int]] = {}
    for i, p in enumerate(params):
        if p.repetition_penalty == 1.0 and p.top_p >= 1.0:
            groups.setdefault((p.temperature, p.top_k), []).append(i)
        else:
            out[i] = choose(logits[i], p, seen[i], rngs[i])
    for (temperature, top_k), rows in groups.items():
        z = logits if len(rows) == len(logits) else logits[rows]
        picks = (
            np.argmax(z, axis=1).tolist()
            if temperature == 0
            else sample_rows(z, temperature, top_k, [rngs[i] for i in rows])
        )
        for i, t in zip(rows, picks, strict=True):
            out[i] = t
    return [int(t) for t in out if t is not None]
