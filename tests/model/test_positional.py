"""Positional encodings: the paper's formula, RoPE's relative property, positions from masks."""

from __future__ import annotations

import math

import torch

from model.positional import RotaryEmbedding, apply_rotary, positions_from_mask, sinusoidal_table


def test_sinusoidal_matches_the_formula() -> None:
    L, d = 50, 16
    table = sinusoidal_table(L, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert math.isclose(table[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(table[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_rope_dot_product_depends_only_on_offset() -> None:
    hs = 16
    rope = RotaryEmbedding(hs, max_len=128)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hs, generator=g), torch.randn(1, 1, 1, hs, generator=g)

    def score(m: int, n: int) -> float:
        return float((apply_rotary(q, *rope(torch.tensor([[m]]))) * apply_rotary(k, *rope(torch.tensor([[n]])))).sum())

    for m, n in [(5, 2), (9, 9), (3, 20)]:
        base = score(m, n)
        for shift in (1, 17, 60):
            assert math.isclose(score(m + shift, n + shift), base, rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score(5, 2), score(5, 4), rel_tol=1e-3)  # and does depend on the offset


def test_rope_preserves_norm() -> None:
    rope = RotaryEmbedding(8, 32)
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(apply_rotary(x, *rope(torch.arange(5).expand(2, 5))).norm(dim=-1), x.norm(dim=-1))


def test_rope_rotates_interleaved_pairs_by_position_times_frequency() -> None:
    hs, pos = 8, 3
    rope = RotaryEmbedding(hs, 16, base=10000.0)
    x = torch.randn(1, 1, 1, hs)
    out = apply_rotary(x, *rope(torch.tensor([[pos]])))[0, 0, 0]
    for i in range(hs // 2):
        theta = pos * 10000.0 ** (-2 * i / hs)
        a, b = x[0, 0, 0, 2 * i].item(), x[0, 0, 0, 2 * i + 1].item()
        assert math.isclose(out[2 * i].item(), a * math.cos(theta) - b * math.sin(theta), abs_tol=1e-5)
        assert math.isclose(out[2 * i + 1].item(), a * math.sin(theta) + b * math.cos(theta), abs_tol=1e-5)


def test_positions_from_mask_left_and_right_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = positions_from_mask(mask)
    assert pos.tolist() == [[0, 1, 2, 2, 2], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
