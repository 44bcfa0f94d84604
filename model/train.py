"""Training: ``attnserve train --out DIR [--corpus PATH ...] [--minutes M | --steps N] [--config small|tiny]``.

Writes into DIR everything the export stage reads: ``checkpoint.pt`` (weights, optimizer and
sampler state for resuming), ``config.json``, ``tokenizer.json``, ``metrics.json`` and
``loss.png``. Validation loss is reported in bits per byte of UTF-8 text, so that any
tokenizer and any model can be compared on the same held-out text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm import tqdm

from model.config import Config, TrainConfig
from model.data import Document, encode_documents, split_documents
from model.tokenizer import EOT, Tokenizer
from model.transformer import Transformer

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
SAMPLE_PROMPT = "To be, or not to be"
VALIDATION_FILE = "validation.txt"  # the held-out documents, joined by the end-of-text token
# Under a time budget, the step count is first estimated after these steps (the very first
# ones pay for allocation), then revised at every validation pass.
CALIBRATION_STEPS = (5, 25)
EVAL_OVERHEAD = 1.03  # the periodic validation passes' share of training time, until measured


@dataclass
class Split:
    """A token stream and the UTF-8 bytes each of its tokens stands for."""

    ids: torch.Tensor  # (N,) int64
    nbytes: torch.Tensor  # (N,) int64; 0 for the document separator


@dataclass
class Evaluation:
    nats_per_token: float
    bits_per_byte: float
    tokens: int
    bytes: int


def lr_at(step: int, total_steps: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at total_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def get_batch(split: Split, seq_len: int, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random windows: x (B, T), y (B, T) shifted by one, and the bytes of y (B, T)."""
    starts = torch.randint(len(split.ids) - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T + 1)
    w = split.ids[idx]
    return w[:, :-1], w[:, 1:], split.nbytes[idx[:, 1:]]


def token_losses(model: Transformer, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Cross-entropy of every target in nats, (B, T) float32."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x.to(device)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none").view_as(y)


@torch.no_grad()
def evaluate(
    model: Transformer, split: Split, seq_len: int, batch_size: int, device: torch.device, max_tokens: int | None = None
) -> Evaluation:
    """Loss over consecutive non-overlapping windows of the split (all of it unless max_tokens).

    Bits per byte = total nats over predicted tokens / their UTF-8 bytes / ln 2. Document
    separators are not text: they count neither nats nor bytes.
    """
    was_training = model.training
    model.eval()
    n_windows = (len(split.ids) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    assert n_windows > 0, f"validation split of {len(split.ids)} tokens is shorter than one window of {seq_len}"
    nats, nbytes, ntok = 0.0, 0, 0
    for s in range(0, n_windows, batch_size):
        idx = torch.arange(s, min(s + batch_size, n_windows))[:, None] * seq_len + torch.arange(seq_len + 1)
        w = split.ids[idx]
        b = split.nbytes[idx[:, 1:]]
        real = b > 0
        losses = token_losses(model, w[:, :-1], w[:, 1:], device).cpu()
        nats += float(losses[real].sum())
        nbytes += int(b.sum())
        ntok += int(real.sum())
    model.train(was_training)
    return Evaluation(nats / ntok, nats / nbytes / LN2, ntok, nbytes)


def make_optimizer(model: Transformer, tc: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains, biases and embeddings are not decayed)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=fused)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(
    cfg: Config, out_dir: Path, docs: list[Document], reuse_tokenizer: bool
) -> tuple[Tokenizer, Split, Split, dict[str, Any]]:
    train_docs, val_docs = split_documents(docs, cfg.train.val_fraction, cfg.train.seed)
    tok_path = out_dir / "tokenizer.json"
    if reuse_tokenizer and tok_path.exists():
        tok = Tokenizer.load(tok_path)
    else:
        tok = Tokenizer.train((d.text for d in train_docs), cfg.model.vocab_size)
        tok.save(tok_path)
    # a small corpus may run out of merges before the vocabulary is full; spare rows stay unused
    assert tok.vocab_size <= cfg.model.vocab_size, (
        f"tokenizer has {tok.vocab_size} tokens, model {cfg.model.vocab_size}"
    )

    # the held-out text travels with the checkpoint, so later stages can measure on it too
    (out_dir / VALIDATION_FILE).write_text(EOT.join(d.text for d in val_docs), encoding="utf-8")
    lengths = torch.from_numpy(tok.token_byte_lengths())
    splits = []
    for part in (train_docs, val_docs):
        ids = torch.from_numpy(encode_documents(part, tok.encode_batch, tok.eot_id))
        splits.append(Split(ids, lengths[ids]))
    corpus = {
        "train_documents": len(train_docs),
        "val_documents": [d.name for d in val_docs],
        "train_bytes": sum(len(d.text.encode()) for d in train_docs),
        "val_bytes": sum(len(d.text.encode()) for d in val_docs),
        "train_tokens": len(splits[0].ids),
        "val_tokens": len(splits[1].ids),
    }
    return tok, splits[0], splits[1], corpus


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint behind


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[Transformer, Config, dict[str, Any]]:
    """Model (eval mode) and config from a checkpoint written by ``train``."""
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = Config.from_dict(state["config"])
    model = Transformer(cfg.model).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, state


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_bits_per_byte"] for h in history], label="train")
    ax.plot(steps, [h["val_bits_per_byte"] for h in history], label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    cfg: Config,
    out_dir: Path,
    docs: list[Document],
    *,
    minutes: float | None = None,
    steps: int | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train until ``steps`` (exact and reproducible) or ``minutes`` of training time; returns metrics.json's content.

    ``stop_at`` ends this run early at that step with the schedule of the full run intact, as
    an interruption would; ``resume=True`` then carries on from the checkpoint.
    """
    assert (minutes is None) != (steps is None) or resume, "give exactly one of minutes or steps"
    tc = cfg.train
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    ckpt_path = out_dir / "checkpoint.pt"

    t_prep = time.perf_counter()
    torch.manual_seed(tc.seed)
    model = Transformer(cfg.model).to(dev)
    optimizer = make_optimizer(model, tc, fused=dev.type == "cuda")
    gen = torch.Generator().manual_seed(tc.seed)
    step, elapsed = 0, 0.0
    history: list[dict[str, float]] = []  # periodic train and validation figures
    total_steps = steps
    if resume:
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        saved = Config.from_dict(state["config"])
        assert saved == cfg, f"checkpoint in {out_dir} was trained with another config: {saved}"
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["sampler"].cpu())  # map_location took it to the device; the sampler lives on the CPU
        step, elapsed = state["step"], state["elapsed"]
        history = state["history"]
        total_steps = steps or state["total_steps"]
        log.info("resuming at step %d of %d", step, total_steps)
    tok, train_split, val_split, corpus = prepare(cfg, out_dir, docs, reuse_tokenizer=resume)
    cfg.save(out_dir / "config.json")
    prep_seconds = time.perf_counter() - t_prep
    log.info(
        "model: %.2fM parameters; corpus: %d train tokens, %d val tokens; device %s, %d threads",
        model.num_params() / 1e6,
        len(train_split.ids),
        len(val_split.ids),
        dev,
        torch.get_num_threads(),
    )

    # Under a time budget the number of steps is estimated from measured speed and revised at
    # every validation pass, so that the cosine schedule ends when the time does.
    budget = None if minutes is None else minutes * 60.0
    if total_steps is None:  # a first guess under a time budget, replaced after CALIBRATION_STEPS
        total_steps = 10**9 if budget is None else step + 10**6
    tokens_per_step = tc.batch_size * tc.seq_len
    # progress None: a bar only on a terminal
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=None if progress is None else not progress,
        unit="step",
        dynamic_ncols=True,
    )
    model.train()
    run_start = time.perf_counter()
    elapsed_at_start, start_step = elapsed, step
    loss_sum, bytes_sum, window_start = 0.0, 0, time.perf_counter()
    window_steps = 0
    stop_reason = "steps"
    while step < total_steps:
        lr = lr_at(step, total_steps, tc)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y, nb = get_batch(train_split, tc.seq_len, tc.batch_size, gen)
        losses = token_losses(model, x, y, dev)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        step += 1
        window_steps += 1
        real = nb > 0
        loss_sum += float(losses.detach().cpu()[real].sum())
        bytes_sum += int(nb.sum())
        bar.update(1)
        elapsed = elapsed_at_start + time.perf_counter() - run_start

        if budget is not None and steps is None and step - start_step in CALIBRATION_STEPS:
            per_step = (time.perf_counter() - run_start) / (step - start_step)
            total_steps = max(step + 1, int((budget - elapsed_at_start) / per_step / EVAL_OVERHEAD) + start_step)
            bar.total = total_steps
        last = step >= total_steps or step == stop_at or (budget is not None and elapsed >= budget)
        if step % tc.eval_interval == 0 or last:
            ev = evaluate(model, val_split, tc.seq_len, tc.batch_size * 4, dev, tc.eval_tokens)
            rate = window_steps * tokens_per_step / (time.perf_counter() - window_start)
            train_bpb = loss_sum / max(1, bytes_sum) / LN2
            history.append(
                {
                    "step": step,
                    "elapsed_seconds": round(elapsed, 2),
                    "lr": lr,
                    "train_bits_per_byte": train_bpb,
                    "val_bits_per_byte": ev.bits_per_byte,
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", val_bpb=f"{ev.bits_per_byte:.3f}", tok_s=f"{rate:,.0f}")
            log.info(
                "step %d/%d  train %.3f bpb  val %.3f bpb  %.0f tok/s  lr %.2e  %.0fs",
                step,
                total_steps,
                train_bpb,
                ev.bits_per_byte,
                rate,
                lr,
                elapsed,
            )
            loss_sum, bytes_sum, window_steps, window_start = 0.0, 0, 0, time.perf_counter()
            elapsed = elapsed_at_start + time.perf_counter() - run_start
            if budget is not None and steps is None and not last:
                per_step = (time.perf_counter() - run_start) / (step - start_step)
                total_steps = max(step + 1, int((budget - elapsed_at_start) / per_step) + start_step)
                bar.total = total_steps
            save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sampler": gen.get_state(),
                    "step": step,
                    "total_steps": total_steps,
                    "elapsed": elapsed,
                    "history": history,
                    "config": cfg.to_dict(),
                },
            )
            if budget is not None and elapsed >= budget:
                stop_reason = "time"
                break
            if step == stop_at:
                stop_reason = "stop_at"
                break
    bar.close()

    final = evaluate(model, val_split, tc.seq_len, tc.batch_size * 4, dev)
    model.eval()
    prompt = torch.tensor([tok.encode(SAMPLE_PROMPT)[: cfg.model.max_seq_len - 1]], device=dev)  # a short context too
    sample_ids = model.generate(
        prompt, max_new_tokens=96, temperature=0.8, top_k=40, generator=torch.Generator(device=dev).manual_seed(tc.seed)
    )
    sample = tok.decode(sample_ids[0].tolist())
    metrics = {
        "steps": step,
        "stop_reason": stop_reason,
        "train_seconds": round(elapsed, 2),
        "prepare_seconds": round(prep_seconds, 2),
        "tokens_per_second": round(step * tokens_per_step / max(elapsed, 1e-9)),
        "parameters": model.num_params(),
        "val": final.__dict__,
        "val_bits_per_byte": final.bits_per_byte,
        "corpus": corpus,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sample_prompt": SAMPLE_PROMPT,
        "sample": sample,
        "history": history,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    plot_history(history, out_dir / "loss.png")
    log.info("done: %d steps in %.1fs, validation %.4f bits per byte", step, elapsed, final.bits_per_byte)
    return metrics
