"""The declared version floors are real: every serving dependency installed at its floor serves a model.

A fresh virtual environment gets exactly the lowest versions pyproject.toml allows (ONNX Runtime's CPU
build in place of the CUDA one, which is the same API in a wheel twenty times larger), and a server
started from it answers over gRPC.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import tomllib
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from tests.venvs import venv_with

ROOT = Path(__file__).resolve().parents[1]
EXPIRY = "attnserve_tls_certificate_expiration_timestamp_seconds"


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


def self_signed(directory: Path) -> tuple[Path, Path, float]:
    """A certificate for 127.0.0.1, signed by its own key, and when it expires (a Unix time)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC).replace(microsecond=0)
    cert = (
        x509.CertificateBuilder(name, name, key.public_key(), x509.random_serial_number(), now, now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (directory / "key.pem").write_bytes(pem)
    return directory / "cert.pem", directory / "key.pem", (now + timedelta(days=2)).timestamp()


def test_every_serving_dependency_declares_a_floor() -> None:
    names = {p.split("==")[0] for p in floors()}
    assert names == {
        "cryptography",
        "googleapis-common-protos",
        "grpcio",
        "grpcio-health-checking",
        "grpcio-reflection",
        "numpy",
        "onnxruntime",
        "opentelemetry-exporter-otlp-proto-grpc",
        "opentelemetry-sdk",
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

    # logging JSON, as the Kubernetes manifests have it, so the floor's python-json-logger is run too;
    # on TLS, so the floor's cryptography reads the certificate's expiry
    cert, key, not_after = self_signed(tmp_path)
    cmd = [str(python), "-m", "service.cli", "--log-format", "json", "serve", "--model-dir", str(model_dir),
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
           "--drain-delay-seconds", "0", "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stderr is not None
    try:
        port = metrics_port = 0
        for line in proc.stderr:
            if m := re.search(r"gRPC on \S+:(\d+) \(TLS\), metrics on :(\d+)", line):
                port, metrics_port = int(m.group(1)), int(m.group(2))
            if "serving " in line:
                assert json.loads(line)["message"].startswith("serving ")
                break
        else:
            pytest.fail(f"the server did not start on the floor versions (exit {proc.wait(10)})")
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(cert.read_bytes()))
        stub = pb_grpc.AttnServeStub(channel)
        assert stub.Encode(pb.EncodeRequest(texts=["at the floor"]), timeout=30).dimensions == 32
        streamed = list(stub.GenerateStream(pb.GenerateRequest(prompt="The king", max_new_tokens=5), timeout=30))
        assert streamed[-1].usage.generated_tokens >= 1
        assert stub.AttentionMap(pb.AttentionMapRequest(text="my lord"), timeout=30).probabilities
        with pytest.raises(grpc.RpcError) as e:  # the call guard's parsing, on the floor protobuf
            channel.unary_unary("/attnserve.v1.AttnServe/Encode")(b"\x00")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        expiry = [s for f in text_string_to_metric_families(scraped) for s in f.samples if s.name == EXPIRY]
        assert [(s.labels, s.value) for s in expiry] == [({"file": "cert"}, not_after)]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
