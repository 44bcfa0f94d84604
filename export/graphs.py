"""The three ONNX graphs cut from one trained transformer, and their names.

* encode:    input_ids, attention_mask -> last_hidden_state, pooled_mean, pooled_last
* decoder:   input_ids, attention_mask, past_key_{i}, past_value_{i} -> logits, new_key_{i}, new_value_{i}
* attention: input_ids, attention_mask -> attentions (B, layers, heads, T, T)
* decoder_attn: the decoder, with attentions (B, layers, heads, T, P + T) as a last output
* kv_write:  cache, new, start -> updated (the CUDA runtime's on-device cache append)
* decoder_step: input_ids (B, 1), past_lengths, past_key_{i}, past_value_{i} -> logits, present_key_{i},
  present_value_{i}: one decoding step for the CPU runtime, attention fused into ONNX Runtime's
  GroupQueryAttention, which appends the new keys and values to the cache in place

Attention probabilities live only in the attention graph, so ONNX Runtime can drop them
from the other two. The decoder takes the past keys and values of every layer as
(B, heads, P, head_dim) with P >= 0 (0 for a prefill) and returns only the T new entries:
the server owns a preallocated cache, passes it in as it lies and writes the new entries
into it, so no step copies the whole cache (see README, "Key/value cache").
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from model.attention import attention
from model.config import ModelConfig
from model.transformer import Block, Transformer, pool

OPSET = 17
INPUTS = ("input_ids", "attention_mask")


def _onnx_export(module: nn.Module, args: tuple[torch.Tensor, ...], path: str, **kwargs: Any) -> None:
    """torch.onnx.export with the TorchScript exporter, which keeps dynamic axes (including an empty
    cache, P = 0) without specialising them. Its tracer warnings concern values that are fixed by the
    model's shape (head size, d_model), so they are silenced here rather than left to alarm readers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's notices of its own future
        warnings.filterwarnings("ignore", category=UserWarning, message=".*aten::index operator.*")
        torch.onnx.export(module, args, path, dynamo=False, opset_version=OPSET, **kwargs)


def past_names(n_layer: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def new_kv_names(n_layer: int) -> list[str]:
    return [f"new_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


class EncodeGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.model(input_ids, attention_mask).hidden  # (B, T, d)
        return hidden, pool(hidden, attention_mask, "mean"), pool(hidden, attention_mask, "last")


class DecoderGraph(nn.Module):
    """The decoder; ``with_attention`` adds its attention probabilities as a last output
    (the ``decoder_attn`` graph, run only for generation requests that ask for them)."""

    def __init__(self, model: Transformer, with_attention: bool = False) -> None:
        super().__init__()
        self.model = model
        self.with_attention = with_attention

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past_flat: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        out = self.model(input_ids, attention_mask, past=past)
        outputs = (out.logits, *(t for kv in out.new_kv for t in kv))
        if self.with_attention:  # (B, L, nh, T, P + T): what each new token attended to
            outputs = (*outputs, torch.stack(out.attentions, dim=1))
        return outputs


class AttentionGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.model(input_ids, attention_mask).attentions, dim=1)  # (B, L, nh, T, T)


def _example(cfg: ModelConfig, B: int = 2, T: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # padding in the example keeps the mask from being folded away as all ones
    return ids, mask


def export_encode(model: Transformer, path: str) -> None:
    ids, mask = _example(model.cfg)
    _onnx_export(
        EncodeGraph(model),
        (ids, mask),
        path,
        input_names=list(INPUTS),
        output_names=["last_hidden_state", "pooled_mean", "pooled_last"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "last_hidden_state": {0: "batch", 1: "seq"},
            "pooled_mean": {0: "batch"},
            "pooled_last": {0: "batch"},
        },
    )


def export_attention(model: Transformer, path: str) -> None:
    ids, mask = _example(model.cfg)
    _onnx_export(
        AttentionGraph(model),
        (ids, mask),
        path,
        input_names=list(INPUTS),
        output_names=["attentions"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "attentions": {0: "batch", 3: "seq", 4: "seq"},
        },
    )


def export_decoder(model: Transformer, path: str, with_attention: bool = False) -> None:
    cfg = model.cfg
    ids, _ = _example(cfg, T=2)
    n_past = 3
    mask = torch.ones(2, n_past + 2, dtype=torch.long)
    mask[1, :2] = 0
    g = torch.Generator().manual_seed(1)
    past = [torch.randn(2, cfg.n_head, n_past, cfg.head_dim, generator=g) for _ in range(2 * cfg.n_layer)]
    pasts, news = past_names(cfg.n_layer), new_kv_names(cfg.n_layer)
    dynamic = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch", 1: "seq"},
    }
    dynamic |= {n: {0: "batch", 2: "past"} for n in pasts}
    dynamic |= {n: {0: "batch", 2: "seq"} for n in news}
    outputs = ["logits", *news]
    if with_attention:
        outputs.append("attentions")
        dynamic["attentions"] = {0: "batch", 3: "seq", 4: "total"}
    _onnx_export(
        DecoderGraph(model, with_attention),
        (ids, mask, *past),
        path,
        input_names=[*INPUTS, *pasts],
        output_names=outputs,
        dynamic_axes=dynamic,
    )


class KVWriteGraph(nn.Module):
    """Writes each slot's new keys and values after its cached ones: the cache append, on the device.

    cache (L, 2, S, nh, M, hs), new (L, 2, S, nh, T, hs), start (S,) -> updated cache. On CUDA the
    runtime keeps the cache in device memory and runs this instead of a host-side write, so the
    cache never crosses the bus. Positions past the end are clamped to the last one, which only
    padding entries of a full slot can reach.
    """

    def forward(self, cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        pos = start.view(1, 1, -1, 1, 1, 1) + torch.arange(new.size(4)).view(1, 1, 1, 1, -1, 1)  # (1,1,S,1,T,1)
        pos = pos.clamp(max=cache.size(4) - 1).expand_as(new)
        return cache.scatter(4, pos, new)


def export_kv_write(cfg: ModelConfig, path: str) -> None:
    shape = (cfg.n_layer, 2, 2, cfg.n_head)
    cache = torch.zeros(*shape, 8, cfg.head_dim)
    new = torch.ones(*shape, 2, cfg.head_dim)
    _onnx_export(
        KVWriteGraph(),
        (cache, new, torch.tensor([0, 3])),
        path,
        input_names=["cache", "new", "start"],
        output_names=["updated"],
        dynamic_axes={
            "cache": {2: "slots", 4: "max_len"},
            "new": {2: "slots", 4: "seq"},
            "start": {0: "slots"},
            "updated": {2: "slots", 4: "max_len"},
        },
    )


class _GroupQueryAttention(torch.autograd.Function):
    """ONNX Runtime's ``com.microsoft.GroupQueryAttention`` for one new token per row, as used here.

    qkv (B, 1, 3 d) packed as ``w_qkv`` writes it; past_key/past_value (B, nh, M, hs) are the whole
    preallocated cache of each row, ``past_lengths`` (B,) int32 how many positions of it are filled.
    The new key and value are written at position ``past_lengths[b]`` (rotated first, with RoPE) and
    the query attends to positions 0 .. past_lengths[b]. The present outputs are the cache itself: the
    runtime binds them to the same memory as the past inputs, so ONNX Runtime appends in place.
    ``forward`` is the reference the exporter traces; ``symbolic`` is the node it writes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        qkv: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        past_lengths: torch.Tensor,
        total_length: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        n_head: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, _, M, hs = past_key.shape
        q, k, v = qkv.view(B, 3, n_head, 1, hs).unbind(1)  # (B, nh, 1, hs) each
        pos = past_lengths.long()
        if cos is not None and sin is not None:  # interleaved pairs (x[2i], x[2i+1]), as RotaryEmbedding turns them
            c = cos[pos].repeat_interleave(2, -1)[:, None, None]
            s = sin[pos].repeat_interleave(2, -1)[:, None, None]
            q, k = (torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2) * s + x * c for x in (q, k))
        at = pos.view(B, 1, 1, 1).expand(B, n_head, 1, hs)
        present_key = past_key.scatter(2, at, k)
        present_value = past_value.scatter(2, at, v)
        mask = (torch.arange(M) <= pos[:, None]).view(B, 1, 1, M)
        y, _ = attention(q, present_key, present_value, mask)  # (B, nh, 1, hs)
        return y.transpose(1, 2).reshape(B, 1, n_head * hs), present_key, present_value

    @staticmethod
    def symbolic(  # type: ignore[no-untyped-def]
        g, qkv, past_key, past_value, past_lengths, total_length, cos, sin, n_head: int
    ):
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor

        none = _optional_input_placeholder_tensor(g)
        rotary = cos is not None and not (hasattr(cos, "node") and cos.node().mustBeNone())
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention",
            qkv,
            none,  # key and value: packed into qkv
            none,
            past_key,
            past_value,
            past_lengths,  # seqlens_k: total length - 1, which is the past length for one new token
            total_length,
            cos if rotary else none,
            sin if rotary else none,
            num_heads_i=n_head,
            kv_num_heads_i=n_head,
            do_rotary_i=int(rotary),
            rotary_interleaved_i=1,
            outputs=3,
        )
        # the exporter cannot infer a contrib op's outputs: out is (B, 1, d), the presents are the pasts
        hidden = qkv.type().sizes()[-1] // 3 if qkv.type().sizes() else None
        out.setType(qkv.type().with_sizes([None, 1, hidden]))
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


class DecoderStepGraph(nn.Module):
    """One decoding step over the cache, in place: the CPU runtime's decode graph.

    The same weights and arithmetic as the model (pre-norm blocks, tied head), with each layer's
    attention as one fused node that appends to the cache where it lies. Positions are the past
    lengths, as ``positions_from_mask`` gives them for a cache filled from position 0.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past_lengths: torch.Tensor, *past_flat: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        total = (past_lengths.max() + 1).to(torch.int32)  # scalar: the longest row, with its new token
        x = m.tok_emb(input_ids)  # (B, 1, d)
        if m.pos_enc is not None:
            x = x + m.pos_enc(past_lengths.long()[:, None])
        cos = sin = None
        if m.rotary is not None:  # (max_len, hs / 2): one angle per pair
            cos, sin = m.rotary.cos[:, 0::2].contiguous(), m.rotary.sin[:, 0::2].contiguous()
        present: list[torch.Tensor] = []
        for i, block in enumerate(m.blocks):
            assert isinstance(block, Block)
            qkv = block.attn.w_qkv(block.ln_1(x))
            y, pk, pv = _GroupQueryAttention.apply(
                qkv, past_flat[2 * i], past_flat[2 * i + 1], past_lengths, total, cos, sin, m.cfg.n_head
            )
            x = x + block.attn.w_o(y)
            x = x + block.mlp(block.ln_2(x))
            present += [pk, pv]
        return (m.lm_head(m.ln_f(x)), *present)


def present_names(n_layer: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def export_decoder_step(model: Transformer, path: str) -> None:
    cfg = model.cfg
    B, M = 2, 8
    g = torch.Generator().manual_seed(2)
    past = [torch.randn(B, cfg.n_head, M, cfg.head_dim, generator=g) for _ in range(2 * cfg.n_layer)]
    ids = torch.randint(cfg.vocab_size, (B, 1), generator=g)
    lengths = torch.tensor([3, 0], dtype=torch.int32)
    pasts, presents = past_names(cfg.n_layer), present_names(cfg.n_layer)
    dynamic = {"input_ids": {0: "batch"}, "past_lengths": {0: "batch"}, "logits": {0: "batch"}}
    dynamic |= {n: {0: "batch", 2: "max_len"} for n in (*pasts, *presents)}
    _onnx_export(
        DecoderStepGraph(model),
        (ids, lengths, *past),
        path,
        input_names=["input_ids", "past_lengths", *pasts],
        output_names=["logits", *presents],
        dynamic_axes=dynamic,
        custom_opsets={"com.microsoft": 1},
    )


def step_graph_problem(path: str, cfg: ModelConfig) -> str | None:
    """Why ONNX Runtime's CPU kernels cannot run this decoder_step graph (None when they can).

    GroupQueryAttention has shape rules of its own (with rotary embeddings, a head size that is a
    multiple of 16); one step at a small shape finds out, rather than a copy of those rules here.
    """
    import numpy as np
    import onnxruntime as ort

    feeds = {"input_ids": np.zeros((1, 1), np.int64), "past_lengths": np.zeros(1, np.int32)}
    feeds |= {n: np.zeros((1, cfg.n_head, 2, cfg.head_dim), np.float32) for n in past_names(cfg.n_layer)}
    so = ort.SessionOptions()
    so.log_severity_level = 4  # the failure is the answer, reported by the caller
    try:
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as e:
        return str(e)
    return None
