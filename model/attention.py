"""Scaled dot-product attention and multi-head attention, written out.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, with the heads split, attended and
concatenated as in "Attention Is All You Need" (section 3.2). It is our own code rather than
``torch.nn.functional.scaled_dot_product_attention`` because the product serves the
attention probabilities themselves, per layer and per head; the tests hold this code
against the torch reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.positional import apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, nh, T_past, hs) each


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    past: KVCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., Tq, dk), k (..., Tk, dk), v (..., Tk, dv); mask broadcastable to (..., Tq, P + Tk), True = may attend.

    ``past`` holds the P cached keys and values (..., P, d) that come before k and v. They are
    attended where they lie instead of being concatenated with k and v, so a decoding step
    never copies the cache. Returns (out (..., Tq, dv), probs (..., Tq, P + Tk)). A query row
    with no key to attend to (a padding slot) gets uniform weights instead of NaN; callers
    ignore those rows.
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Tq, Tk)
    if past is not None:
        scores = torch.cat(((q @ past[0].transpose(-2, -1)) * scale, scores), dim=-1)  # (..., Tq, P + Tk)
    if mask is not None:
        # the dtype's lowest value, not -inf: exp() of it is exactly 0, and a fully masked row stays finite
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if past is None:
        return probs @ v, probs
    n_past = past[0].size(-2)
    return probs[..., :n_past] @ past[1] + probs[..., n_past:] @ v, probs


def causal_mask(t_q: int, t_k: int, device: torch.device | None = None) -> torch.Tensor:
    """(Tq, Tk) bool: query i (the last Tq of Tk positions) sees keys 0 .. Tk - Tq + i."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with an optional key/value cache and rotary positions.

    W_Q, W_K and W_V are stored stacked in one ``(3 d, d)`` projection, as
    ``nn.MultiheadAttention``'s ``in_proj_weight`` does, so the three run as one matrix
    multiply; ``w_o`` is W^O.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        assert d_model % n_head == 0, f"d_model ({d_model}) must be divisible by n_head ({n_head})"
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.w_qkv = nn.Linear(d_model, 3 * d_model)
        self.w_o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """x (B, T, d); mask broadcastable to (B, nh, T, T_past + T), True = may attend;
        rotary: cos, sin and turn for the T new positions (see ``RotaryEmbedding``);
        past: cached keys and values (B, nh, T_past, hs).

        Returns (out (B, T, d), the T new keys and values (B, nh, T, hs) each, probs (B, nh, T, T_past + T)).
        The caller owns the cache and appends the new entries where it keeps them.
        """
        # 1) project to h x d_k; one reshape and one permute for all three keeps the exported graph short
        qkv = self.w_qkv(x).unflatten(-1, (3, self.n_head, self.head_dim)).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        if rotary is not None:
            q, k = apply_rotary(qkv[:2], *rotary).unbind(0)  # q and k turned together: (B, nh, T, hs) each
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        # 2) attend, over the cache and the new keys
        y, probs = attention(q, k, v, mask, past)  # (B, nh, T, hs), (B, nh, T, T_past + T)
        # 3) concat the heads and project with W^O
        y = y.transpose(1, 2).flatten(2)  # (B, T, d)
        return self.dropout(self.w_o(y)), (k, v), probs
