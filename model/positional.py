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
    q_m . k_n depends only on m - n. ``forward`` returns what ``apply_rotary`` needs.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
        inv_freq = torch.exp(torch.arange(0, head_dim, 2, dtype=torch.float32) * (-math.log(base) / head_dim))
        angles = torch.arange(max_len, dtype=torch.float32).unsqueeze(1) * inv_freq  # (L, hs/2)
        angles = angles.repeat_interleave(2, dim=1)  # (L, hs): both members of a pair turn by the same angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        # x @ turn maps each pair (a, b) to (-b, a): the quarter turn, as one small matrix product
        # instead of strided slices (which cost a chain of small ops per layer in the exported graph)
        turn = torch.zeros(head_dim, head_dim)
        idx = torch.arange(0, head_dim, 2)
        turn[idx + 1, idx] = -1.0
        turn[idx, idx + 1] = 1.0
        self.register_buffer("turn", turn, persistent=False)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.turn: torch.Tensor

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (B, T) -> (B, 1, T, hs): the 1 broadcasts over heads
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1), self.turn


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (..., T, hs) by its angle: x cos + (quarter-turned x) sin."""
    return x * cos + (x @ turn) * sin
