"""The committed protobuf code is what grpcio-tools makes of the committed .proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("protos/attnserve/v1/attnserve.proto", "protos/inference/grpc_predict_v2.proto")


@pytest.mark.parametrize("proto", PROTOS)
def test_generated_code_is_current(tmp_path: Path, proto: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        proto,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    stem = proto.removesuffix(".proto")
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        fresh = (tmp_path / (stem + suffix)).read_text()
        committed = (ROOT / (stem + suffix)).read_text()
        assert fresh == committed, f"{stem + suffix} is stale: run `make protos`"


def test_service_has_every_rpc() -> None:
    from protos.attnserve.v1 import attnserve_pb2

    service = attnserve_pb2.DESCRIPTOR.services_by_name["AttnServe"]
    assert {m.name for m in service.methods} == {
        "Encode",
        "AttentionMap",
        "Generate",
        "GenerateStream",
        "Tokenize",
        "GetModelInfo",
    }
    assert service.methods_by_name["GenerateStream"].server_streaming
