"""The declared version floors are real: every serving dependency installed at its floor serves a model.

A fresh virtual environment gets exactly the lowest versions pyproject.toml allows (ONNX Runtime's CPU
build in place of the CUDA one, which is the same API in a wheel twenty times larger), and a server
started from it answers over gRPC.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import grpc
import pytest

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from tests.venvs import venv_with

ROOT = Path(__file__).resolve().parents[1]


def floors() -> list[str]:
    """name==floor for each serving dependency of this platform."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(;.*)?", dep)
        assert m, f"{dep!r}: every serving dependency declares a floor"
        name = "onnxruntime" if m.group(1) == "onnxruntime-gpu" else m.group(1)
        pins[name] = f"{name}=={m.group(2)}"
    return sorted(pins.values())


def test_every_serving_dependency_declares_a_floor() -> None:
    names = {p.split("==")[0] for p in floors()}
    assert names == {
        "grpcio",
        "grpcio-health-checking",
        "grpcio-reflection",
        "numpy",
        "onnxruntime",
        "prometheus-client",
        "protobuf",
        "python-json-logger",
        "tokenizers",
    }


@pytest.mark.network
@pytest.mark.install
def test_the_server_runs_on_every_floor(model_dir: Path, tmp_path: Path) -> None:
    python = venv_with(tmp_path / "floor", floors())
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    for pin in floors():
        assert pin.lower() in freeze.stdout.lower().replace("_", "-"), (pin, freeze.stdout)

    # logging JSON, as the Kubernetes manifests have it, so the floor's python-json-logger is run too
    cmd = [str(python), "-m", "service.cli", "--log-format", "json", "serve", "--model-dir", str(model_dir),
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
           "--drain-delay-seconds", "0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stderr is not None
    try:
        port = 0
        for line in proc.stderr:
            if m := re.search(r"gRPC on \S+:(\d+)", line):
                port = int(m.group(1))
            if "serving " in line:
                assert json.loads(line)["message"].startswith("serving ")
                break
        else:
            pytest.fail(f"the server did not start on the floor versions (exit {proc.wait(10)})")
        stub = pb_grpc.AttnServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.Encode(pb.EncodeRequest(texts=["at the floor"]), timeout=30).dimensions == 32
        streamed = list(stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=5), timeout=30))
        assert streamed[-1].usage.generated_tokens >= 1
        assert stub.AttentionMap(pb.AttentionMapRequest(text="my lord"), timeout=30).probabilities
        with pytest.raises(grpc.RpcError) as e:  # the call guard's parsing, on the floor protobuf
            grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/attnserve.v1.AttnServe/Encode")(b"\x00")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
