"""The transformer: cached decoding, padding invariance, pooling."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Transformer, extend_cache, pool

TOL = 1e-5
KINDS = ["rope", "sinusoidal", "learned"]


def _model(positional: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=48, positional=positional)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("positional", KINDS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(positional: str) -> None:
    model = _model(positional)
    ids = torch.randint(97, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    out = model(ids[:, :5])  # prefill a prompt, then one token at a time
    past, steps = out.new_kv, [out.logits]
    for t in range(5, 20):
        out = model(ids[:, t : t + 1], past=past)
        past = extend_cache(past, out.new_kv)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("positional", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_does_not_change_outputs(positional: str, side: str) -> None:
    model = _model(positional)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 97, (n,), generator=g) for n in (11, 4, 8)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    batched = model(ids, mask)
    for b, s in enumerate(seqs):
        alone = model(s[None])
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(batched.logits[b, sl], alone.logits[0], atol=TOL, rtol=TOL)
        torch.testing.assert_close(batched.hidden[b, sl], alone.hidden[0], atol=TOL, rtol=TOL)
        for la, lb in zip(batched.attentions, alone.attentions, strict=True):
            torch.testing.assert_close(la[b][:, sl, sl], lb[0], atol=TOL, rtol=TOL)
        for how in ("mean", "last"):
            torch.testing.assert_close(
                pool(batched.hidden, mask, how)[b],
                pool(alone.hidden, torch.ones(1, len(s)), how)[0],
                atol=TOL,
                rtol=TOL,
            )


@torch.no_grad()
def test_cached_decoding_of_a_left_padded_batch() -> None:
    model = _model("rope")
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    nxt = torch.tensor([[9], [9]])
    out = model(ids, mask)
    step = model(nxt, torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), 1), past=out.new_kv)
    alone = model(torch.tensor([[5, 6, 7, 9]]))
    torch.testing.assert_close(step.logits[0, -1], alone.logits[0, -1], atol=TOL, rtol=TOL)


def test_pool_mean_and_last() -> None:
    hidden = torch.arange(12, dtype=torch.float32).view(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.5, 2.5, 3.5], [6.0, 7.0, 8.0]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")  # type: ignore[arg-type]


def test_head_is_tied_to_embeddings() -> None:
    model = _model("rope")
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_over_long_input_is_refused() -> None:
    model = _model("learned")
    with pytest.raises(AssertionError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))
