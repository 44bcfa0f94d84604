"""A compact decoder-only transformer: pre-norm blocks on our own attention, a weight-tied head.

``forward`` is a pure function of its inputs (ids, mask, past cache) so that the same module
exports to ONNX unchanged; it returns logits, the last hidden states, the new cache and the
attention probabilities of every layer, and the caller keeps what it needs.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from model.attention import KVCache, MultiHeadAttention, causal_mask
from model.config import ModelConfig
from model.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    positions_from_mask,
)


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    hidden: torch.Tensor  # (B, T, d): after the final norm
    new_kv: list[KVCache]  # per layer: keys and values of the T new tokens (B, nh, T, hs); see extend_cache
    attentions: list[torch.Tensor]  # per layer: (B, nh, T, T_past + T)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): pre-norm trains stably at high learning rates."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        past: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        a, new_kv, probs = self.attn(self.ln_1(x), mask, rotary, past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, new_kv, probs


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_enc: nn.Module | None = None
        self.rotary: RotaryEmbedding | None = None
        if cfg.positional == "sinusoidal":
            self.pos_enc = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_seq_len)
        elif cfg.positional == "learned":
            self.pos_enc = LearnedPositionalEmbedding(cfg.d_model, cfg.max_seq_len)
        else:
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.w_o.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past: list[KVCache] | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T_past + T), 1 = real token, 0 = padding; past: per-layer cache."""
        B, T = input_ids.shape
        t_past = 0 if past is None else past[0][0].size(2)
        if attention_mask is None:
            attention_mask = torch.ones(B, t_past + T, dtype=torch.long, device=input_ids.device)
        t_k = attention_mask.size(1)
        assert t_k == t_past + T, f"attention_mask covers {t_k} positions, expected past {t_past} + new {T}"
        assert t_k <= self.cfg.max_seq_len, f"sequence of {t_k} exceeds max_seq_len {self.cfg.max_seq_len}"

        positions = positions_from_mask(attention_mask)[:, t_past:]  # (B, T)
        keys_real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        mask = causal_mask(T, t_k, input_ids.device) & keys_real  # (B, 1, T, Tk)

        x = self.tok_emb(input_ids)  # (B, T, d)
        if self.pos_enc is not None:
            x = x + self.pos_enc(positions)
        x = self.drop(x)
        rotary = self.rotary(positions) if self.rotary is not None else None

        new_kv: list[KVCache] = []
        attentions: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, kv, probs = block(x, mask, rotary, None if past is None else past[i])
            new_kv.append(kv)
            attentions.append(probs)
        hidden = self.ln_f(x)  # (B, T, d)
        return ModelOutput(self.lm_head(hidden), hidden, new_kv, attentions)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of (B, T) unpadded prompts with the cache. temperature 0 is greedy."""
        out = self(input_ids)
        past = out.new_kv
        ids = input_ids
        for _ in range(max_new_tokens):
            if ids.size(1) >= self.cfg.max_seq_len:
                break
            logits = out.logits[:, -1, :]  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (B, 1)
            ids = torch.cat((ids, nxt), dim=1)
            out = self(nxt, past=past)
            past = extend_cache(past, out.new_kv)
        return ids


def extend_cache(past: list[KVCache] | None, new: list[KVCache]) -> list[KVCache]:
    """Append each layer's new keys and values to the cache along time (a simple cache for PyTorch use)."""
    if past is None:
        return new
    return [(torch.cat((pk, nk), 2), torch.cat((pv, nv), 2)) for (pk, pv), (nk, nv) in zip(past, new, strict=True)]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: Literal["mean", "last"]) -> torch.Tensor:
    """Sentence embedding from hidden (B, T, d) and mask (B, T): mean over real tokens, or the last real token.

    Works for left- and right-padded batches alike.
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if how == "mean":
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
    if how == "last":
        T = attention_mask.size(1)
        idx = (attention_mask.long() * torch.arange(1, T + 1, device=hidden.device)).argmax(-1)  # (B,)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), idx]  # (B, d)
    raise ValueError(f"pooling must be 'mean' or 'last', got {how!r}")
