"""Our attention against torch's reference implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from model.attention import MultiHeadAttention, attention, causal_mask

TOL = 1e-5


def _qkv(B: int = 3, H: int = 4, T: int = 7, D: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, T, D, generator=g) for _ in range(3))


def _padding(B: int, T: int) -> torch.Tensor:
    """(B, T) bool key mask: row b has T - b real tokens, then padding."""
    return torch.arange(T)[None, :] < (T - torch.arange(B))[:, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_sdpa(causal: bool, padded: bool) -> None:
    q, k, v = _qkv()
    B, _, T, _ = q.shape
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    if causal:
        mask &= causal_mask(T, T)
    if padded:
        mask &= _padding(B, T)[:, None, None, :]
    out, probs = attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # every query row here has at least one key to attend to, so all rows compare
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    assert probs.shape == (B, 4, T, T)


def test_probabilities_sum_to_one_over_valid_keys_and_zero_elsewhere() -> None:
    q, k, v = _qkv()
    B, _, T, _ = q.shape
    keys = _padding(B, T)
    mask = causal_mask(T, T) & keys[:, None, None, :]
    _, probs = attention(q, k, v, mask)
    valid_queries = keys[:, None, :].expand(B, 4, T)
    sums = probs.sum(-1)[valid_queries]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=TOL, rtol=0)
    assert torch.all(probs.masked_select(~mask.expand_as(probs)) == 0)


def test_fully_masked_row_stays_finite() -> None:
    q, k, v = _qkv(B=1, T=3)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    out, probs = attention(q, k, v, mask)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()


def _ours_from_torch(ref: nn.MultiheadAttention, d: int, h: int) -> MultiHeadAttention:
    ours = MultiHeadAttention(d, h)
    with torch.no_grad():
        ours.w_qkv.weight.copy_(ref.in_proj_weight)
        ours.w_qkv.bias.copy_(ref.in_proj_bias)
        ours.w_o.weight.copy_(ref.out_proj.weight)
        ours.w_o.bias.copy_(ref.out_proj.bias)
    return ours


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_multihead_matches_nn_multiheadattention(causal: bool, padded: bool) -> None:
    torch.manual_seed(0)
    B, T, d, h = 3, 9, 32, 4
    ref = nn.MultiheadAttention(d, h, batch_first=True).eval()
    ours = _ours_from_torch(ref, d, h).eval()
    x = torch.randn(B, T, d)
    keys = _padding(B, T) if padded else torch.ones(B, T, dtype=torch.bool)
    allowed = keys[:, None, None, :] & (causal_mask(T, T) if causal else torch.ones(T, T, dtype=torch.bool))
    # nn.MultiheadAttention takes True = masked out, and a (B * h, T, T) mask
    ref_mask = (~allowed).expand(B, h, T, T).reshape(B * h, T, T)
    ref_out, ref_probs = ref(x, x, x, attn_mask=ref_mask, need_weights=True, average_attn_weights=False)
    out, _, probs = ours(x, allowed)
    valid = keys  # compare real query rows only; padded rows are ignored by every caller
    torch.testing.assert_close(out[valid], ref_out[valid], atol=TOL, rtol=TOL)
    torch.testing.assert_close(probs.transpose(1, 2)[valid], ref_probs.transpose(1, 2)[valid], atol=TOL, rtol=TOL)


def test_attending_to_a_cache_equals_attending_to_everything() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    full_out, (k, v), full_probs = mha(x, causal_mask(5, 5))
    out_a, past, _ = mha(x[:, :3], causal_mask(3, 3))
    out_b, (k_new, v_new), probs_b = mha(x[:, 3:], causal_mask(2, 5), past=past)
    torch.testing.assert_close(torch.cat((out_a, out_b), 1), full_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(probs_b, full_probs[:, :, 3:], atol=TOL, rtol=TOL)
    # only the new entries come back; the caller appends them to its cache
    torch.testing.assert_close(torch.cat((past[0], k_new), 2), k)
    torch.testing.assert_close(torch.cat((past[1], v_new), 2), v)


def test_attention_with_an_empty_cache() -> None:
    q, k, v = _qkv()
    empty = (k[:, :, :0], v[:, :, :0])
    out, probs = attention(q, k, v, causal_mask(7, 7), past=empty)
    ref, ref_probs = attention(q, k, v, causal_mask(7, 7))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs, ref_probs)
