"""Model and training configuration.

Frozen dataclasses, validated once when built and saved next to every checkpoint as
``config.json``, so every later stage (export, serving) reads the exact shape the weights
were trained with instead of guessing it. Nothing here imports torch: the serving side
reads the same file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Positional = Literal["rope", "sinusoidal", "learned"]
POSITIONAL_KINDS: tuple[str, ...] = ("rope", "sinusoidal", "learned")


def _require(ok: bool, message: str) -> None:
    """Validation that holds under ``python -O`` too (where asserts are gone)."""
    if not ok:
        raise ValueError(message)


def _require_finite(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _require(not isinstance(value, float) or math.isfinite(value), f"{f.name} must be finite, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024  # byte-level BPE: 256 byte tokens + merges + 1 special; a small head is cheap on CPU
    n_layer: int = 3  # at a fixed CPU budget, a shallower model taking more steps learned more (see README)
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512  # 4 * d_model, as in the paper
    max_seq_len: int = 256  # longest context the positional tables and the server accept
    positional: Positional = "rope"  # rope | sinusoidal | learned
    rope_base: float = 10000.0
    dropout: float = 0.0  # short CPU runs underfit; dropout only slows them down
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _require_finite(self)
        _require(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _require(self.n_layer > 0, f"n_layer must be positive, got {self.n_layer}")
        _require(self.n_head > 0, f"n_head must be positive, got {self.n_head}")
        _require(
            self.d_model % self.n_head == 0, f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
        )
        _require(self.d_ff > 0, f"d_ff must be positive, got {self.d_ff}")
        _require(self.max_seq_len > 0, f"max_seq_len must be positive, got {self.max_seq_len}")
        _require(
            self.positional in POSITIONAL_KINDS,
            f"positional must be one of {POSITIONAL_KINDS}, got {self.positional!r}",
        )
        if self.positional == "rope":
            _require(self.head_dim % 2 == 0, f"rope needs an even head_dim, got {self.head_dim}")
        if self.positional == "sinusoidal":
            _require(self.d_model % 2 == 0, f"sinusoidal needs an even d_model, got {self.d_model}")
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 64  # training window (<= model.max_seq_len): short windows buy more optimizer steps
    batch_size: int = 24
    lr: float = 4e-3  # small models tolerate a high peak rate with warm-up and clipping
    min_lr: float = 4e-4  # cosine decays to lr / 10, as nanoGPT does
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only; norms, biases and embeddings are not decayed
    beta1: float = 0.9
    beta2: float = 0.99  # small batches: a shorter second-moment memory reacts faster
    grad_clip: float = 1.0
    eval_interval: int = 200  # steps between validation passes
    eval_tokens: int = 8192  # tokens per periodic validation pass (the final pass uses all)
    val_fraction: float = 0.05  # share of corpus bytes held out, as whole documents
    seed: int = 1337
    tokenizer_vocab_size: int = 1024  # must equal model.vocab_size

    def __post_init__(self) -> None:
        _require_finite(self)
        _require(self.seq_len > 1, f"seq_len must be > 1, got {self.seq_len}")
        _require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}")
        _require(0 < self.min_lr <= self.lr, f"need 0 < min_lr <= lr, got {self.min_lr}, {self.lr}")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.grad_clip > 0, f"grad_clip must be positive, got {self.grad_clip}")
        _require(self.eval_interval > 0, f"eval_interval must be positive, got {self.eval_interval}")
        _require(0.0 < self.val_fraction < 0.5, f"val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(frozen=True)
class Config:
    """Everything a training run needs; saved whole as ``config.json``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
        )
        _require(
            self.train.tokenizer_vocab_size == self.model.vocab_size,
            f"tokenizer_vocab_size ({self.train.tokenizer_vocab_size}) != vocab_size ({self.model.vocab_size})",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls(model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Config:
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _preset(model: dict[str, Any], train: dict[str, Any]) -> Config:
    vocab = model.get("vocab_size", ModelConfig.vocab_size)
    return Config(ModelConfig(**model), TrainConfig(tokenizer_vocab_size=vocab, **train))


PRESETS: dict[str, Config] = {
    # The default: tuned to learn as much as possible per second on two CPU cores.
    "small": _preset({}, {}),
    # For tests: trains in seconds, still big enough to show learning.
    "tiny": _preset(
        {"vocab_size": 384, "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "max_seq_len": 64},
        {
            "seq_len": 32,
            "batch_size": 16,
            "lr": 1e-2,
            "min_lr": 1e-3,
            "warmup_steps": 10,
            "eval_interval": 50,
            "eval_tokens": 2048,
            "val_fraction": 0.2,
        },
    ),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
