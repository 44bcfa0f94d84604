"""Servers in processes of their own, for the benchmarks and the tests that need a real process."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def machine() -> str:
    """What the figures were measured on: architecture, cores, the processor's model name, and the
    interpreter that ran the servers and the loads, with where it is installed (its build, and with it
    how fast Python code runs, depends on where it came from: a distribution's or an official image's
    build is optimized with profiles and link-time optimization, a default pyenv build is not)."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    python = f"{platform.python_implementation()} {platform.python_version()} ({sys.base_prefix})"
    return f"{platform.machine()}, {os.cpu_count()} cores, {name or 'cpu'}; {python}"


def accelerator(device: str, device_id: int = 0) -> str:
    """What runs the model: "cpu", or the CUDA device's name and driver as nvidia-smi gives them."""
    if device != "cuda":
        return "cpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={device_id}", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out = ""
    name, _, driver = out.partition(",")
    return f"cuda {device_id}: {name.strip()}, driver {driver.strip()}" if out else f"cuda {device_id}"


def device_flags(device: str, variant: str) -> tuple[str, ...]:
    """The serve flags that put a benchmark's server on ``device`` with ``variant``'s graphs (CUDA required)."""
    flags = ("--device", device, "--variant", variant)
    return (*flags, "--require-cuda") if device == "cuda" else flags


def start_server(
    model_dir: Path, *flags: str, env: dict[str, str] | None = None, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """``attnserve serve`` on a free loopback port, in its own process; returns once it says it serves.
    With ``cpus``, the process and every thread it starts run on those cores only.

    Its stderr stays open for the caller (the rest of the log)."""
    return launch(serve_args(model_dir, *flags), env=env, cpus=cpus)


def serve_args(model_dir: Path, *flags: str) -> list[str]:
    """The arguments to python of ``attnserve serve`` on a free loopback port, on the CPU, no metrics port."""
    return ["-m", "service.cli", "--log-level", "INFO", "serve", "--model-dir", str(model_dir), "--host",
            "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--device", "cpu", *flags]  # fmt: skip


# What a server's process (or a profiler's) does before it runs, in a Python of its own that then
# becomes the command (exec keeps both): it is told to stop (SIGTERM) when the thread that started it
# ends (the main thread, in the benchmarks and tests: so when their process ends, however it ends; a
# benchmark stopped by ``timeout`` or killed left every server it had started running, pinned to the
# server's core, under the next run), and with cores given it runs on those only. Not a preexec_fn:
# that runs Python in the child of a fork of a process whose gRPC threads may be mid-call, and one
# such child died of SIGABRT before the server it was to become logged a line.
_PRELUDE = """
import ctypes, os, sys
parent, cores, command = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if sys.platform == "linux":
    ctypes.CDLL(None).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    if os.getppid() != parent:  # it ended before the line above: nobody is left to stop this one
        os._exit(1)
if cores:
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
os.execvp(command[0], command)
"""


def prelude(command: list[str], cpus: set[int] | None = None) -> list[str]:
    """``command``, stopped with the thread that starts it and, given ``cpus``, run on those cores
    only, every thread it starts included (see _PRELUDE)."""
    return [sys.executable, "-c", _PRELUDE, str(os.getpid()), ",".join(map(str, sorted(cpus or ()))), *command]


def launch(
    args: list[str], env: dict[str, str] | None = None, cpus: set[int] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """``python ARGS``, a server that logs "gRPC on HOST:PORT" and then "serving ..." on stderr;
    returns once it serves, with its port."""
    proc = subprocess.Popen(prelude([sys.executable, *args], cpus), stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    port = 0
    for line in proc.stderr:
        if m := re.search(r"gRPC on \S+:(\d+)", line):
            port = int(m.group(1))
        if "serving " in line:
            return proc, port
    proc.wait(10)
    raise RuntimeError(f"the server did not start (exit {proc.returncode})")


@contextmanager
def running(args: list[str], cpus: set[int] | None = None) -> Iterator[tuple[str, int]]:
    """``launch(args)`` for the length of a with-block; yields its address and pid, and stops it with SIGTERM."""
    proc, port = launch(args, cpus=cpus)
    try:
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def server_process(model_dir: Path, *flags: str, cpus: set[int] | None = None) -> Iterator[str]:
    """An attnserve server for the length of a with-block; yields its address."""
    with running(serve_args(model_dir, *flags), cpus) as (address, _):
        yield address
