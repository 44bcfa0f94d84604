"""The attnserve command: subcommands, and no heavy import before one runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser
from service.config import ServerConfig
from tests.conftest import synthetic_corpus


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, service.cli; print('torch' in sys.modules, 'model.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_train_from_the_command_line(tmp_path: Path) -> None:
    files = []
    for doc in synthetic_corpus(n_docs=6):
        f = tmp_path / f"{doc.name}.txt"
        f.write_text(doc.text, encoding="utf-8")
        files.append(str(f))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "train",
        "--config",
        "tiny",
        "--steps",
        "30",
        "--out",
        str(out),
        "--corpus",
        *files,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bits per byte" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["steps"] == 30 and metrics["corpus"]["train_documents"] + len(metrics["corpus"]["val_documents"]) == 6
    )


def test_unknown_subcommand_fails_with_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "service.cli", "fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_serve_takes_its_settings_from_a_config_file_under_its_flags_and_environment(tmp_path: Path) -> None:
    """One file for every setting (a ConfigMap's, or a machine's), flags and ATTNSERVE_* variables
    still first; paths in it are relative to the file, and what it cannot be is said, by name."""
    (tmp_path / "keys").write_text("alice key-a\n")
    config = tmp_path / "attnserve.toml"
    config.write_text(
        "port = 6000\nmax_concurrent_calls = 12\nclient_calls_per_second = 2\naccess_log = true\n"
        'api_keys_file = "keys"\n'
    )

    def read(*argv: str, env: dict[str, str] | None = None) -> ServerConfig:
        return ServerConfig.from_sources(build_parser().parse_args(["serve", *argv]), env or {})

    cfg = read("--config", str(config))
    assert (cfg.port, cfg.max_concurrent_calls, cfg.client_calls_per_second, cfg.access_log) == (6000, 12, 2.0, True)
    assert cfg.api_keys_file == tmp_path / "keys" and cfg.api_keys == {"key-a": "alice"}
    assert cfg.max_probe_streams == ServerConfig().max_probe_streams  # what it leaves out, the default
    cfg = read("--port", "7000", env={"ATTNSERVE_CONFIG": str(config), "ATTNSERVE_MAX_CONCURRENT_CALLS": "5"})
    assert (cfg.port, cfg.max_concurrent_calls, cfg.access_log) == (7000, 5, True)  # the flag, the variable, the file
    for text, says in [
        ("prot = 6000\n", "names no setting 'prot'"),
        ('port = "6000"\n', "port is int, not '6000'"),
        ("access_log = 1\n", "access_log is bool, not 1"),
        ("api_keys_file = 3\n", "api_keys_file is a path, not 3"),
        ("port = \n", "is not TOML"),
    ]:
        config.write_text(text)
        with pytest.raises(ValueError, match=says):
            read("--config", str(config))
    with pytest.raises(ValueError, match="config: cannot read"):
        read("--config", str(tmp_path / "none.toml"))
