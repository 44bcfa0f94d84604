"""Configuration: validated once, saved and loaded whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import Config, ModelConfig, TrainConfig, preset


def test_presets_are_valid_and_round_trip(tmp_path: Path) -> None:
    for name in ("small", "tiny"):
        cfg = preset(name)
        cfg.save(tmp_path / f"{name}.json")
        assert Config.load(tmp_path / f"{name}.json") == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_head": 4}, "divisible"),
        ({"positional": "alibi"}, "positional"),
        ({"d_model": 12, "n_head": 4, "d_ff": 8}, "even head_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"rope_base": float("nan")}, "rope_base must be finite"),
        ({"norm_eps": float("inf")}, "norm_eps must be finite"),
    ],
)
def test_bad_model_config_names_the_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_training_window_must_fit_the_context() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        Config(ModelConfig(max_seq_len=64), TrainConfig(seq_len=128))


def test_validation_holds_without_asserts() -> None:
    """Under python -O asserts vanish; the checks must not."""
    import subprocess
    import sys

    code = (
        "from model.config import TrainConfig\n"
        "try:\n    TrainConfig(lr=float('nan'))\nexcept ValueError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert "lr must be finite" in out.stdout, out.stderr


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown config"):
        preset("huge")
