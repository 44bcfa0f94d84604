"""ONNX Runtime against PyTorch: the checks an export must pass, and the measurements it reports."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from export.timing import median_seconds
from model.tokenizer import Tokenizer
from model.transformer import Transformer, extend_cache, pool
from service.model_dir import STEP_GRAPH
from service.runtime import Runtime, pad_right
from service.sampling import log_softmax

TOLERANCE = 1e-4  # max abs difference, fp32
DECODE_STEPS = 32


def _batch(cfg_max: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Right-padded ids (B, T) and mask of mixed lengths, the longest near the context limit."""
    lengths = [min(cfg_max, n) for n in (cfg_max - 3, 5, cfg_max // 2, 1)]
    rng = np.random.default_rng(seed)
    ids, mask = pad_right([rng.integers(0, vocab, n) for n in lengths])
    return ids, mask, lengths


def _bound(tol: float, ref: np.ndarray, relative: bool) -> float:
    """The largest difference allowed: ``tol``, or with ``relative`` ``tol`` times the reference's
    largest magnitude (at least 1), as fp16's spacing grows with the numbers it holds."""
    return tol * max(1.0, float(np.max(np.abs(ref))) if ref.size else 0.0) if relative else tol


def _diff(a: np.ndarray, b: np.ndarray, tol: float, relative: bool = False) -> dict[str, Any]:
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    bound = _bound(tol, b, relative)
    return {"max_abs_diff": d, **({"bound": bound} if relative else {}), "ok": bool(np.isfinite(d) and d <= bound)}


@torch.no_grad()
def check_parity(
    model: Transformer, rt: Runtime, tolerance: float = TOLERANCE, relative: bool = False
) -> dict[str, Any]:
    """Every graph against the PyTorch model on a padded batch of mixed lengths, and cached greedy decoding.
    ``relative``: each difference is held to ``tolerance`` times the reference's largest magnitude."""
    cfg = model.cfg
    ids, mask, lengths = _batch(cfg.max_seq_len, cfg.vocab_size)
    ref = model(torch.from_numpy(ids), torch.from_numpy(mask))
    valid = mask.astype(bool)
    out: dict[str, Any] = {"tolerance": tolerance, "relative": relative, "batch_lengths": lengths}

    enc = rt.encode(ids, mask)
    t_mask = torch.from_numpy(mask)
    out["encode_hidden"] = _diff(enc.last_hidden_state[valid], ref.hidden.numpy()[valid], tolerance, relative)
    out["encode_pooled_mean"] = _diff(enc.pooled_mean, pool(ref.hidden, t_mask, "mean").numpy(), tolerance, relative)
    out["encode_pooled_last"] = _diff(enc.pooled_last, pool(ref.hidden, t_mask, "last").numpy(), tolerance, relative)

    probs = rt.attention(ids, mask)  # (B, L, nh, T, T)
    ref_probs = torch.stack(ref.attentions, 1).numpy()
    rows = valid[:, None, None, :, None] & valid[:, None, None, None, :]  # real queries x real keys
    rows = np.broadcast_to(rows, probs.shape)
    out["attention_probs"] = _diff(probs[rows], ref_probs[rows], tolerance, relative)

    logits, _ = rt.decode(ids, mask)
    out["decoder_logits"] = _diff(logits[valid], ref.logits.numpy()[valid], tolerance, relative)
    out["cached_decoding"] = _cached_decoding(model, rt, tolerance, fused=False, relative=relative)
    if STEP_GRAPH in rt.sessions:  # the CPU step graph, with its in-place cache append
        out["cached_decoding_step_graph"] = _cached_decoding(model, rt, tolerance, fused=True, relative=relative)
    out["decode_steps"] = DECODE_STEPS
    out["decode_tokens_equal"] = all(v["tokens_equal"] for k, v in out.items() if k.startswith("cached_decoding"))
    return out


def _prompts(rt: Runtime) -> tuple[list[np.ndarray], int]:
    """Two prompts of different lengths, and how many tokens to decode after them."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, rt.info.vocab_size, n) for n in (7, 3)], min(DECODE_STEPS, rt.info.max_seq_len - 8)


def _runtime_greedy(
    rt: Runtime, prompts: list[np.ndarray], steps: int, fused: bool, forced: list[list[int]] | None = None
) -> tuple[list[list[int]], np.ndarray]:
    """Greedy decoding of the prompts batched through one runtime cache: tokens per prompt, and the
    logits each token was chosen from (prompts, steps, V). ``fused``: steps through decoder_step.
    ``forced``: each step feeds these tokens instead of the runtime's own picks (still returned)."""
    cache = rt.new_cache(len(prompts))
    logits = rt.decode_step(cache, *pad_right(prompts))
    last = np.stack([logits[b, len(p) - 1] for b, p in enumerate(prompts)])
    tokens: list[list[int]] = [[] for _ in prompts]
    chosen_from = []
    for i in range(steps):
        nxt = last.argmax(-1)
        for b in range(len(prompts)):
            tokens[b].append(int(nxt[b]))
        chosen_from.append(last)
        if forced is not None:
            nxt = np.array([f[i] for f in forced])
        last = rt.decode_step(cache, nxt[:, None], np.ones((len(prompts), 1), np.int64), fused)[:, 0]
    return tokens, np.stack(chosen_from, axis=1)


def _cached_decoding(
    model: Transformer, rt: Runtime, tolerance: float, fused: bool, relative: bool = False
) -> dict[str, Any]:
    """Greedy decoding of two prompts of different lengths, batched through the runtime's cache,
    against each prompt decoded alone by PyTorch with its own cache. ``fused``: the steps run the
    decoder_step graph (else the decoder graph).

    With ``relative`` (fp16) the runtime is fed PyTorch's tokens: fp16 may pick the other of two
    logits closer than its rounding, and from there the two would decode different texts and the
    logits could not be compared. Its own picks are reported, and do not decide ``ok``."""
    prompts, steps = _prompts(rt)
    ref_tokens, ref_logits = [], []
    for p in prompts:
        o = model(torch.from_numpy(p)[None])
        past, toks, lgs = o.new_kv, [], []
        last = o.logits[0, -1]
        for _ in range(steps):
            nxt = int(last.argmax())
            toks.append(nxt)
            lgs.append(last.numpy())
            o = model(torch.tensor([[nxt]]), past=past)
            past = extend_cache(past, o.new_kv)
            last = o.logits[0, -1]
        ref_tokens.append(toks)
        ref_logits.append(np.stack(lgs))
    tokens, got = _runtime_greedy(rt, prompts, steps, fused, forced=ref_tokens if relative else None)
    want = np.stack(ref_logits)
    diff = float(np.max(np.abs(got - want)))
    bound = _bound(tolerance, want, relative)
    equal = tokens == ref_tokens
    out: dict[str, Any] = {"max_abs_diff": diff, "tokens_equal": equal, "ok": (relative or equal) and diff <= bound}
    if relative:
        out["bound"] = bound
        out["picks_agree"] = int(np.sum(np.array(tokens) == np.array(ref_tokens)))
    return out | {"steps": steps}


def step_graph_agreement(rt: Runtime, reference: Runtime, floor: float) -> dict[str, Any]:
    """Cached greedy decoding with steps through decoder_step against steps through the decoder graph,
    on one runtime: the check for a variant (int8) that has no PyTorch twin to compare with.

    Both graphs are fed the decoder graph's own greedy tokens, and the step graph may differ from it
    by at most what the variant differs from ``reference`` (fp32) on the same tokens, or ``floor``.
    Dynamic int8 quantizes each activation tensor on the fly; the two graphs' arithmetic order can
    move one activation across a quantization step, and from then on every logit differs by about a
    step's worth (0.16 in one default model, whose int8 decoder was 0.41 from fp32): noise of the
    variant's own size, where a step graph that decodes wrongly is off by the logits' whole scale.
    The step graph's own greedy picks are reported beside, and do not decide ``ok``."""
    prompts, steps = _prompts(rt)
    tokens, plain = _runtime_greedy(rt, prompts, steps, fused=False)
    picks, fused = _runtime_greedy(rt, prompts, steps, fused=True, forced=tokens)
    _, want = _runtime_greedy(reference, prompts, steps, fused=False, forced=tokens)
    diff = float(np.max(np.abs(fused - plain)))
    bound = max(float(np.max(np.abs(plain - want))), floor)
    return {
        "max_abs_diff": diff,
        "bound": bound,
        "picks_agree": int(np.sum(np.array(picks) == np.array(tokens))),
        "ok": diff <= bound,
        "steps": steps,
    }


def decoder_bits_per_byte(rt: Runtime, windows: list[np.ndarray], batch: int = 32) -> float:
    """Validation loss of the decoder graph in bits per byte over (T + 1)-token windows."""
    lengths = Tokenizer(rt.tokenizer).token_byte_lengths()
    nats, nbytes = 0.0, 0
    for s in range(0, len(windows), batch):
        w = np.stack(windows[s : s + batch])
        x, y = w[:, :-1], w[:, 1:]
        logits, _ = rt.decode(x, np.ones_like(x))
        logp = log_softmax(logits)
        tok_nats = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
        b = lengths[y]
        nats += float(tok_nats[b > 0].sum())
        nbytes += int(b.sum())
    return float(nats / nbytes / np.log(2.0))


def time_decoder(rt: Runtime, cached: int = 128) -> dict[str, float]:
    """Median ms of a 128-token prefill and of one decode step at batch 1 with 128 cached tokens."""
    n = min(cached, rt.info.max_seq_len - 1)
    ids = np.ones((1, n), np.int64)
    prefill = median_seconds(lambda: rt.decode(ids, np.ones_like(ids)), runs=30) * 1e3
    cache = rt.new_cache(1)
    one = np.ones((1, 1), np.int64)

    def step() -> None:
        cache.lengths[:] = n  # keep the cache at n tokens: each timed step is the same step
        rt.decode_step(cache, one, one)

    return {f"prefill_{n}": prefill, "decode_step": median_seconds(step, runs=30) * 1e3}
