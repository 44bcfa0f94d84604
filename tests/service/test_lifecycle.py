"""The server as an operator runs it: a process configured by flags and environment, stopped by a signal."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bench.timing import start_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.batcher import CPU_BATCH_TOKENS, CUDA_BATCH_TOKENS
from service.config import ServerConfig


@pytest.fixture
def process(model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc, port = start_server(
        model_dir, "--max-queue-delay-ms", "400", env={**os.environ, "ATTNSERVE_MAX_BATCH_SIZE": "64"}
    )
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_with_requests_in_flight_loses_none(process: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = process
    stub = pb_grpc.AttnServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    futures = [stub.Encode.future(pb.EncodeRequest(texts=[f"request {i}"]), timeout=20) for i in range(12)]
    time.sleep(0.15)  # they are queued: the batch window is 400 ms
    proc.send_signal(signal.SIGTERM)
    assert all(len(f.result().embeddings) == 1 for f in futures)
    assert proc.wait(30) == 0
    assert proc.stderr is not None
    assert "stopped" in proc.stderr.read()


def test_a_server_told_to_log_json_writes_nothing_else(model_dir: Path) -> None:
    """ATTNSERVE_LOG_FORMAT=json: every line on stderr, through a call and a drain, is a JSON record."""
    env = {**os.environ, "ATTNSERVE_LOG_FORMAT": "json", "ATTNSERVE_DRAIN_DELAY_SECONDS": "0"}
    proc, port = start_server(model_dir, env=env)
    try:
        stub = pb_grpc.AttnServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.Encode(pb.EncodeRequest(texts=["hi"]), timeout=20).embeddings
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        records = [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [r["message"] for r in records][-1] == "stopped"
    assert {r["logger"] for r in records} == {"service.server"}
    assert all(r["level"] == "INFO" and r["time"] for r in records)


def test_sigint_stops_an_idle_server_cleanly(process: tuple[subprocess.Popen[str], int]) -> None:
    proc, _ = process
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def test_a_missing_model_directory_fails_start_up_naming_it(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--model-dir",
        str(tmp_path / "nothing"),
        "--port",
        "0",
        "--metrics-port",
        "-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nothing/config.json: missing" in proc.stderr


def test_settings_come_from_flags_then_environment_then_defaults() -> None:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    env = {"ATTNSERVE_PORT": "6000", "ATTNSERVE_MAX_QUEUE_DELAY_MS": "7.5", "ATTNSERVE_REQUIRE_CUDA": "no"}
    cfg = ServerConfig.from_sources(parser.parse_args(["--port", "7000"]), env)
    assert cfg.port == 7000 and cfg.max_queue_delay_ms == 7.5 and cfg.require_cuda is False
    assert cfg.metrics_port == 8000 and cfg.grace_seconds == 20.0
    with pytest.raises(ValueError, match="port"):
        ServerConfig.from_sources(None, {"ATTNSERVE_PORT": "seven"})
    with pytest.raises(ValueError, match="device"):
        ServerConfig.from_sources(None, {"ATTNSERVE_DEVICE": "tpu"})
    with pytest.raises(ValueError, match="tls"):
        ServerConfig.from_sources(None, {"ATTNSERVE_TLS_CERT": "/x.pem"})
    assert ServerConfig.from_sources(None, {"ATTNSERVE_MAX_BATCHES_IN_FLIGHT": "1"}).batch_limits().max_in_flight == 1
    with pytest.raises(ValueError, match="batch limits"):
        ServerConfig.from_sources(None, {"ATTNSERVE_MAX_BATCHES_IN_FLIGHT": "0"})
    # padded tokens a batch holds: chosen for the device unless set
    assert cfg.max_batch_tokens == 0
    assert cfg.batch_limits().max_batch_tokens == CPU_BATCH_TOKENS
    assert cfg.batch_limits(threads=2).max_batch_tokens == 2 * CPU_BATCH_TOKENS  # about a thousand a thread
    assert cfg.batch_limits(threads=1000).max_batch_tokens == CUDA_BATCH_TOKENS  # and no more than on a GPU
    assert cfg.batch_limits(cuda=True).max_batch_tokens == CUDA_BATCH_TOKENS > CPU_BATCH_TOKENS
    chosen = ServerConfig.from_sources(None, {"ATTNSERVE_MAX_BATCH_TOKENS": "1024"})
    assert chosen.batch_limits(threads=4).max_batch_tokens == chosen.batch_limits(cuda=True).max_batch_tokens == 1024
    with pytest.raises(ValueError, match="batch limits"):
        ServerConfig.from_sources(None, {"ATTNSERVE_MAX_BATCH_TOKENS": "-1"})


def test_command_line_client(process: tuple[subprocess.Popen[str], int], tmp_path: Path) -> None:
    _, port = process
    base = [sys.executable, "-m", "service.cli", "client", "--address", f"127.0.0.1:{port}"]

    def run(*args: str) -> str:
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "32 dims" in run("encode", "Good sir", "the crown")
    out = run("attention", "The king speaks", "--layers", "1", "--png", str(tmp_path))
    assert "(1, 2, 3, 3)" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["layer1_head0.png", "layer1_head1.png"]
    assert '"name": "tiny"' in run("info")
    bad = subprocess.run([*base, "attention", "hi", "--layers", "9"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "INVALID_ARGUMENT (INVALID_INPUT): layers" in bad.stderr, bad.stderr
