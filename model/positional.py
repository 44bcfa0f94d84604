"""Positional information: sinusoidal, rotary (RoPE) and learned.

Every encoding is indexed by explicit positions rather than by a token's slot in the
tensor. Positions come from the attention mask (``positions_from_mask``), so a left-padded
row starts at position 0 at its first real token, and a cached decoding step continues
from where the prompt ended.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of every token: how many real tokens precede it. mask (B, T) of 0/1 -> (B, T) int64.

    Padding slots get position 0; they are masked out of attention anyway.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)). -> (max_len, d)."""
    assert d_model % 2 == 0, f"d_model must be even, got {d_model}"
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    # 1 / 10000^(2i/d) computed in log space: exp(-2i * ln(10000) / d)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed encoding added to the token embeddings ("Attention Is All You Need", section 3.5)."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)
        self.table: torch.Tensor

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]  # (B, T, d)


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position, added to the token embeddings (GPT-2 style)."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)  # (B, T, d)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021): rotates q and k inside attention.

    Pairs (x[2i], x[2i+1]) of each head vector are rotated by angle pos * base^(-2i/hs), so
    q_m . k_n depends only on m - n. Returns cos/sin to hand to ``apply_rotary``.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
        inv_freq = torch.exp(torch.arange(0, head_dim, 2, dtype=torch.float32) * (-math.log(base) / head_dim))
        angles = torch.arange(max_len, dtype=torch.float32).unsqueeze(1) * inv_freq  # (L, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.cos: torch.Tensor
        self.sin: torch.Tensor

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, T) -> (B, 1, T, hs/2): the 1 broadcasts over heads
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, nh, T, hs) by the angles in cos/sin (B, 1, T, hs/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2) each
    r1 = x1 * cos - x2 * sin
    r2 = x1 * sin + x2 * cos
    return torch.stack((r1, r2), dim=-1).flatten(-2)  # interleave back: (B, nh, T, hs)
