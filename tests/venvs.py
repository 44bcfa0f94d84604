"""Virtual environments built from the package registry for a test, skipped where it cannot be reached."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

UNREACHABLE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def venv_with(env_dir: Path, packages: list[str]) -> Path:
    """A virtual environment at ``env_dir`` holding ``packages`` (binary wheels only); its python.
    Made once: an environment already there with the same packages is used as it is."""
    python = env_dir / "bin" / "python"
    stamp = env_dir / "attnserve-packages.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(packages):
        return python
    venv.create(env_dir, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:"]
    installed = subprocess.run([*pip, *packages], capture_output=True, text=True, timeout=600)
    if installed.returncode != 0 and any(s in installed.stderr for s in UNREACHABLE):
        pytest.skip(f"the package registry could not be reached: {installed.stderr[-300:]}")
    assert installed.returncode == 0, installed.stderr[-2000:]
    stamp.write_text("\n".join(packages))
    return python
