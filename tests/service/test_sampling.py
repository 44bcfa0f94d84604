"""Sampling alone: greedy, temperature, top-k, top-p, repetition penalty, batches equal rows."""

from __future__ import annotations

import math

import numpy as np

from service.sampling import SamplingParams, choose, choose_batch, kept, kept_rows, sample_row, sample_rows

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))


def draws(params: SamplingParams, n: int = 20000, logits: np.ndarray = LOGITS) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.bincount([choose(logits, params, np.array([], np.int64), rng) for _ in range(n)], minlength=len(logits))


def test_greedy_takes_the_argmax() -> None:
    assert choose(LOGITS, SamplingParams(temperature=0), np.array([]), np.random.default_rng(0)) == 0


def test_temperature_one_follows_the_model() -> None:
    freq = draws(SamplingParams(temperature=1.0)) / 20000
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.01)


def test_temperature_sharpens_and_flattens() -> None:
    assert draws(SamplingParams(temperature=0.3))[0] > draws(SamplingParams(temperature=1.0))[0]
    assert draws(SamplingParams(temperature=3.0))[4] > draws(SamplingParams(temperature=1.0))[4]


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(np.nonzero(draws(SamplingParams(top_k=2)))[0]) == {0, 1}
    assert set(np.nonzero(draws(SamplingParams(top_p=0.8)))[0]) == {0, 1, 2}  # 0.5 + 0.25 < 0.8 <= 0.9
    freq = draws(SamplingParams(top_k=2)) / 20000
    np.testing.assert_allclose(freq[:2], [2 / 3, 1 / 3], atol=0.01)


def test_repetition_penalty_lowers_seen_tokens() -> None:
    rng = np.random.default_rng(0)
    p = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert choose(LOGITS, p, np.array([0]), rng) == 1
    assert choose(np.array([2.0, 1.0]), p, np.array([0]), rng) == 1  # positive logits are divided


def test_a_batch_picks_what_each_row_would() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((6, 50))
    params = [
        SamplingParams(temperature=0.8, top_k=10),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3),
        SamplingParams(temperature=0.8, top_k=10),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0, repetition_penalty=1.3),
    ]
    seen = [[1, 2], [], [3], [], [4], [5, 5]]
    batch = choose_batch(logits, params, seen, [np.random.default_rng(i) for i in range(6)])
    rows = [choose(logits[i], params[i], np.asarray(seen[i], np.int64), np.random.default_rng(i)) for i in range(6)]
    assert batch == rows
    # a batch of one row, as the seen ids come from a sequence (a list)
    alone = [choose_batch(logits[i : i + 1], [params[i]], [seen[i]], [np.random.default_rng(i)])[0] for i in range(6)]
    assert alone == rows


def test_top_k_keeps_exactly_k_with_ties_lowest_index_first() -> None:
    z = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    assert kept(z, 3).tolist() == [1, 2, 3]
    assert kept(z, 1).tolist() == [1]
    assert kept(z, 0) is None and kept(z, 6) is None
    with_nan = np.array([np.nan, 1.0, np.nan, 0.5], np.float32)
    assert kept(with_nan, 2).tolist() == [1, 3]


def test_a_batch_samples_each_row_as_it_would_alone() -> None:
    """The batched arithmetic equals the one-row path, seed for seed, with and without ties at the
    k-th value (which send the batch row by row)."""
    rng = np.random.default_rng(2)
    for trial in range(60):
        n = [2, 5, 16][trial % 3]
        z = (rng.standard_normal((n, 300)) * 3).astype(np.float32)
        if trial % 4 == 0:
            z = np.round(z)  # many ties
        for temperature, top_k in ((0.8, 40), (1.0, 0), (0.3, 1), (1.7, 299)):
            batch = sample_rows(z, temperature, top_k, [np.random.default_rng(trial * 50 + i) for i in range(n)])
            alone = [sample_row(z[i], temperature, top_k, np.random.default_rng(trial * 50 + i)) for i in range(n)]
            assert batch == alone


def test_a_large_vocabulary_keeps_each_row_s_top_k_as_the_row_alone_would() -> None:
    """Rows of a vocabulary several times the groups' count find their k-th largest from the groups'
    maxima: the same kept indices as one row alone, through ties (which send the batch row by row),
    NaNs, an infinite logit and a vocabulary that is no multiple of the groups' count."""
    rng = np.random.default_rng(5)
    for trial in range(48):
        n, V = [(2, 1024), (16, 1024), (16, 1000), (5, 3001)][trial % 4]
        z = (rng.standard_normal((n, V)) * 3).astype(np.float32)
        if trial % 3 == 0:
            z = np.round(z)
        if trial % 5 == 1:
            z[0, rng.integers(0, V, 6)] = np.nan
        if trial % 7 == 2:
            z[1, 17] = np.inf
        for top_k in (1, 10, 40, 100):
            rows = [kept(z[i], top_k) for i in range(n)]
            batch = kept_rows(z, top_k)
            if batch is not None:
                assert all(np.array_equal(batch[0][i], rows[i]) for i in range(n))
                assert all(np.array_equal(batch[1][i], z[i, rows[i]]) for i in range(n))
            else:  # only a tie at some row's k-th value, or a NaN, may send the batch row by row
                assert trial % 3 == 0 or trial % 5 == 1
            seeds = [np.random.default_rng(trial * 50 + i) for i in range(n)]
            alone = [sample_row(z[i], 0.8, top_k, np.random.default_rng(trial * 50 + i)) for i in range(n)]
            assert sample_rows(z, 0.8, top_k, seeds) == alone


def test_rows_of_nan_still_give_a_token_of_the_vocabulary() -> None:
    z = np.random.default_rng(3).standard_normal((6, 50)).astype(np.float32)
    z[1] = np.nan
    z[2, :45] = np.nan  # fewer real values than top_k
    picks = sample_rows(z, 1.0, 10, [np.random.default_rng(i) for i in range(6)])
    assert all(0 <= t < 50 for t in picks)
    assert picks[2] >= 45


def test_parameter_problems_name_the_field() -> None:
    bad = SamplingParams(max_new_tokens=0, temperature=math.nan, top_p=0.0, repetition_penalty=-1, stop=("",))
    text = " ".join(bad.problems(max_new_tokens=64))
    for field in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "stop"):
        assert field in text
    assert SamplingParams().problems(64) == []


def test_infinite_logits_pick_alike_in_a_batch_and_alone() -> None:
    """An infinite logit (an fp16 logit that overflowed, say) outweighs every finite one: it is the pick,
    the first of several, in a batch and alone, and no inf - inf turns the weights into NaN on the way."""
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((3, 100)) * 2).astype(np.float32)
    z[0, 7] = np.inf
    z[1, [3, 9]] = np.inf  # no ties at the k-th value: the batch gets as far as numpy together
    with np.errstate(all="raise"):
        for top_k in (0, 10, 40, 70):
            batch = sample_rows(z, 0.9, top_k, [np.random.default_rng(i) for i in range(3)])
            alone = [sample_row(z[i], 0.9, top_k, np.random.default_rng(i)) for i in range(3)]
            assert batch == alone and batch[:2] == [7, 3]


def test_an_infinite_logit_is_chosen_under_every_setting_and_all_minus_infinity_still_gives_a_token() -> None:
    up = np.zeros(50, np.float32)
    up[17] = np.inf
    down = np.full(50, -np.inf, np.float32)
    with np.errstate(all="raise"):
        for temperature in (0.0, 0.7, 1.0):
            for top_k in (0, 5):
                for top_p in (1.0, 0.9):
                    for penalty in (1.0, 1.3):
                        params = SamplingParams(
                            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty
                        )
                        assert choose(up, params, [17, 2], np.random.default_rng(0)) == 17
                        assert 0 <= choose(down, params, [1], np.random.default_rng(0)) < 50


def test_a_sequence_shows_the_penalty_its_prompt_and_tokens_only_when_it_has_one() -> None:
    import random

    from service.scheduler import Sequence

    plain = Sequence(0, [1, 2], SamplingParams(), random.Random(0), None)
    penalized = Sequence(1, [1, 2], SamplingParams(repetition_penalty=1.3), random.Random(0), None)
    for seq in (plain, penalized):
        seq.generated += [3, 3]
    assert plain.seen == []
    assert penalized.seen == [1, 2, 3, 3]
