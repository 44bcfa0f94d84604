"""What a benchmark's report says the model ran on, and the flags that put its server there."""

from __future__ import annotations

import os
import platform
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.timing import accelerator, device_flags, machine
from service.cli import build_parser


def test_the_machine_names_its_cores_and_the_interpreter_that_ran_the_figures() -> None:
    named = machine()
    assert f"{os.cpu_count()} cores" in named
    # the interpreter's build moves the server's own cost: its version and where it is installed
    assert named.endswith(f"; CPython {platform.python_version()} ({sys.base_prefix})")


def test_the_cpu_is_named_as_such() -> None:
    assert accelerator("cpu") == "cpu"


def test_a_cuda_device_is_named_by_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "NVIDIA H100 80GB HBM3, 580.159.04"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert accelerator("cuda", 1) == "cuda 1: NVIDIA H100 80GB HBM3, driver 580.159.04"
    assert "--id=1" in (tmp_path / "args").read_text()


def test_a_cuda_device_without_nvidia_smi_is_named_by_its_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert accelerator("cuda") == "cuda 0"


def test_a_cuda_benchmark_requires_cuda_rather_than_measuring_the_fallback() -> None:
    args = build_parser().parse_args(["serve", *device_flags("cuda", "fp16")])
    assert (args.device, args.variant, args.require_cuda) == ("cuda", "fp16", True)
    args = build_parser().parse_args(["serve", *device_flags("cpu", "fp32")])
    assert (args.device, args.variant, args.require_cuda) == ("cpu", "fp32", None)


def test_the_benchmarks_take_a_device_and_a_variant() -> None:
    for bench in ("encode", "generate"):
        args = build_parser().parse_args(["bench", bench, "--model-dir", "m", "--device", "cuda", "--variant", "fp16"])
        assert (args.device, args.variant) == ("cuda", "fp16")
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", bench, "--model-dir", "m", "--device", "tpu"])


PARENT = """
import time
from bench.transport import floor_server
with floor_server(8) as (address, pid):
    print(pid, flush=True)
    time.sleep(120)
"""


def gone(pid: int) -> bool:
    """Ended: no such process, or one that has ended and waits to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="prctl's parent-death signal is Linux's")
def test_a_server_ends_when_the_process_that_started_it_is_killed() -> None:
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert parent.stdout is not None
        server = int(parent.stdout.readline())
        assert not gone(server)
        parent.send_signal(signal.SIGKILL)  # no finally, no with-block's exit: only the kernel can tell it
        parent.wait(10)
        deadline = time.monotonic() + 20
        while not gone(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(server)
    finally:
        parent.kill()
