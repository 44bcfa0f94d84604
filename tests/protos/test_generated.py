"""The committed protobuf code is what grpcio-tools makes of the committed .proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "protos/attnserve/v1/attnserve.proto"
GENERATED = ("attnserve_pb2.py", "attnserve_pb2.pyi", "attnserve_pb2_grpc.py")


def test_generated_code_is_current(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        PROTO,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "protos/attnserve/v1" / name).read_text()
        committed = (ROOT / "protos/attnserve/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"


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
