"""Training end to end on a tiny model: it learns, it writes what export needs, it resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import Config, preset
from model.data import Document
from model.tokenizer import Tokenizer
from model.train import evaluate, load_checkpoint, lr_at, prepare, train

STEPS = 300


@pytest.fixture(scope="module")
def trained(corpus: list[Document], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tiny")
    return out, train(preset("tiny"), out, corpus, steps=STEPS, progress=False)


def test_validation_loss_falls_well_below_uniform_guessing(trained: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = trained
    vocab = Tokenizer.load(out / "tokenizer.json").vocab_size
    uniform = math.log(vocab)  # nats per token of a uniform guess
    assert metrics["val"]["nats_per_token"] < 0.35 * uniform, metrics["val"]
    history = metrics["history"]
    assert history[-1]["val_bits_per_byte"] < history[0]["val_bits_per_byte"]
    assert metrics["steps"] == STEPS


def test_writes_everything_export_reads(trained: tuple[Path, dict[str, Any]]) -> None:
    out, metrics = trained
    for name in ("checkpoint.pt", "config.json", "tokenizer.json", "metrics.json", "loss.png", "validation.txt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Config.load(out / "config.json") == preset("tiny")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_bits_per_byte"] == pytest.approx(metrics["val_bits_per_byte"])
    assert saved["sample"].startswith(saved["sample_prompt"])


def test_checkpoint_round_trips(trained: tuple[Path, dict[str, Any]], corpus: list[Document]) -> None:
    out, metrics = trained
    model, cfg, state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == STEPS
    _, _, val, _ = prepare(cfg, out, corpus, reuse_tokenizer=True)
    dev = torch.device(metrics["device"])  # the same arithmetic as at the end of training (bf16 autocast on CUDA)
    again = evaluate(model.to(dev), val, cfg.train.seq_len, 64, dev)
    assert again.bits_per_byte == pytest.approx(metrics["val_bits_per_byte"], rel=1e-6)


def straight_and_resumed(corpus: list[Document], tmp_path: Path, device: str) -> tuple[dict, dict]:
    """The weights of 40 steps in one run, and of 20 steps, stopped, then resumed to 40."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_interval=10))
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    train(cfg, straight, corpus, steps=40, progress=False, device=device)
    first = train(cfg, paused, corpus, steps=40, progress=False, stop_at=20, device=device)
    assert first["steps"] == 20 and first["stop_reason"] == "stop_at"
    second = train(cfg, paused, corpus, resume=True, progress=False, device=device)
    assert second["steps"] == 40 and second["device"] == device
    a = torch.load(straight / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(paused / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    return a, b


def test_resume_continues_exactly(corpus: list[Document], tmp_path: Path) -> None:
    a, b = straight_and_resumed(corpus, tmp_path, "cpu")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


@pytest.mark.gpu
def test_resume_on_cuda_carries_on_where_it_stopped(corpus: list[Document], tmp_path: Path) -> None:
    """On CUDA the sampler's state comes back from the checkpoint on the device and must return to the CPU;
    the weights agree closely, not bit for bit (bf16 autocast; CUDA's backward kernels need not be deterministic)."""
    a, b = straight_and_resumed(corpus, tmp_path, "cuda")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-2, rtol=0, msg=name)


def test_resume_refuses_another_config(trained: tuple[Path, dict[str, Any]], corpus: list[Document]) -> None:
    out, _ = trained
    other = dataclasses.replace(preset("tiny"), train=dataclasses.replace(preset("tiny").train, lr=2e-2))
    with pytest.raises(AssertionError, match="another config"):
        train(other, out, corpus, resume=True, progress=False)


def test_time_budget_stops_training(corpus: list[Document], tmp_path: Path) -> None:
    metrics = train(preset("tiny"), tmp_path, corpus, minutes=0.05, progress=False)
    assert metrics["train_seconds"] < 3.0 + 5.0  # the budget, plus one validation pass and slack for a slow machine
    assert metrics["steps"] > 10


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    tc = preset("small").train
    lrs = [lr_at(s, 1000, tc) for s in range(1000)]
    assert lrs[0] < lrs[tc.warmup_steps - 1] == pytest.approx(tc.lr)
    assert all(a >= b for a, b in zip(lrs[tc.warmup_steps :], lrs[tc.warmup_steps + 1 :], strict=False))
    assert lr_at(1000, 1000, tc) == pytest.approx(tc.min_lr)
