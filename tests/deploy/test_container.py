"""The CPU image, built and run by a real container engine (podman), as an operator would run it.

Built from deploy/docker/Dockerfile.cpu unmodified; run read-only, as its non-root user, with the
model directory mounted read-only and the port moved (ATTNSERVE_PORT) to show that the image's own
HEALTHCHECK follows the configuration. Then Encode, Generate and /metrics through the published
ports, no torch in the image, and `podman stop` under streaming load: every stream finishes and
the server exits 0.

Where podman is missing or cannot run containers, the tests are skipped, saying so. Where no
registry can be reached, the base image is made from Debian's packages (deploy/podman/base-image.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
BASE = "docker.io/library/python:3.11-slim-bookworm"
TAG = "localhost/attnserve:cpu-test"
PORT = 50052  # not the default: the HEALTHCHECK must find it through ATTNSERVE_PORT
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def podman(*args: str, check: bool = True, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy/podman/containers.conf")}
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return out  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed here (make test installs it where Debian's packages can be had)")
    info = podman("info", check=False, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-300:]}")
    if podman("image", "exists", BASE, check=False).returncode != 0:
        pulled = podman("pull", "--quiet", BASE, check=False, timeout=120)
        if pulled.returncode != 0:
            if shutil.which("mmdebstrap") is None:
                pytest.skip(f"{BASE} cannot be pulled here and mmdebstrap is not installed to make a stand-in")
            env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy/podman/containers.conf")}
            made = subprocess.run([str(ROOT / "deploy/podman/base-image.sh"), BASE], capture_output=True, text=True,
                                  timeout=600, env=env)  # fmt: skip
            assert made.returncode == 0, made.stderr[-3000:]


@pytest.fixture(scope="module")
def image(engine: None, model_dir: Path) -> Iterator[str]:
    """The CPU image, built with the test model baked in (MODEL_DIR must lie in the build context)."""
    context_model = ROOT / "build" / "image-test-model"
    shutil.rmtree(context_model, ignore_errors=True)
    shutil.copytree(model_dir, context_model)
    build = ["build", "--format", "docker", "-f", "deploy/docker/Dockerfile.cpu", "-t", TAG,
             "--build-arg", "MODEL_DIR=build/image-test-model"]  # fmt: skip
    if HOST_CA.exists():  # pip in the build steps trusts what the host trusts (a proxy's CA, say)
        build += ["--volume", f"{HOST_CA}:{HOST_CA}:ro"]
    t0 = time.monotonic()
    podman(*build, ".", cwd=ROOT)
    seconds = time.monotonic() - t0
    size = int(podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout.strip())
    print(f"\nimage {TAG}: built in {seconds:.0f} s, {size / 1e6:.0f} MB")
    yield TAG
    shutil.rmtree(context_model, ignore_errors=True)


@pytest.fixture
def container(image: str, model_dir: Path) -> Iterator[str]:
    name = f"attnserve-test-{uuid.uuid4().hex[:8]}"
    podman("run", "--detach", "--name", name, "--read-only", "--env", f"ATTNSERVE_PORT={PORT}",
           "--publish", f"127.0.0.1::{PORT}", "--publish", "127.0.0.1::8000",
           "--volume", f"{model_dir}:/models/default:ro", image)  # fmt: skip
    try:
        yield name
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def published(name: str, port: int) -> str:
    return podman("port", name, f"{port}/tcp").stdout.strip().splitlines()[0]


def wait_healthy(name: str, timeout: float = 90) -> None:
    """The image's own HEALTHCHECK command, run by podman, until it passes."""
    end = time.monotonic() + timeout
    while True:
        if podman("healthcheck", "run", name, check=False).returncode == 0:
            return
        if time.monotonic() > end:
            logs = podman("logs", name, check=False)
            pytest.fail(f"never healthy:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        time.sleep(1)


def test_image_serves_read_only_as_its_own_user(image: str, container: str) -> None:
    wait_healthy(container)
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert inspected["Healthcheck"]["Test"][-1] == "health"  # kept: built in docker format
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert podman("exec", container, "id", "-u").stdout.strip() == "10001"

    stub = pb_grpc.AttnServeStub(grpc.insecure_channel(published(container, PORT)))
    encoded = stub.Encode(pb.EncodeRequest(texts=["in a container"]), timeout=30)
    assert encoded.embeddings[0].token_count > 0
    generated = stub.Generate(pb.GenerateRequest(prompt="The king", max_new_tokens=8), timeout=30)
    assert generated.usage.generated_tokens >= 1
    metrics = urllib.request.urlopen(f"http://{published(container, 8000)}/metrics", timeout=10).read().decode()
    assert 'attnserve_requests_total{code="OK",rpc="Encode"} 1.0' in metrics

    no_torch = podman("run", "--rm", "--entrypoint", "python", image, "-c",
                      "import importlib.util as u; print(u.find_spec('torch') is None)")  # fmt: skip
    assert no_torch.stdout.strip() == "True"
    logs = podman("logs", container)
    assert "Permission denied" not in logs.stderr and "HOME" not in logs.stderr, logs.stderr[-2000:]


def test_podman_stop_drains_every_stream(container: str) -> None:
    wait_healthy(container)
    address = published(container, PORT)
    results: list[pb.GenerateStreamResponse | BaseException] = []
    started = threading.Barrier(9)

    def stream() -> None:
        stub = pb_grpc.AttnServeStub(grpc.insecure_channel(address))
        try:
            last = None
            request = pb.GenerateRequest(prompt="The", max_new_tokens=48)
            for i, message in enumerate(stub.GenerateStream(request, timeout=60)):
                if i == 0:
                    started.wait(30)
                last = message
                time.sleep(0.05)  # a client that reads at its own pace: the call stays open past SIGTERM
            results.append(last if last is not None else RuntimeError("no message"))
        except BaseException as e:
            results.append(e)
            started.abort()

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(60)  # every stream has its first token
    stopped = podman("stop", container, timeout=60)  # SIGTERM, SIGKILL after the default 10 s
    for t in threads:
        t.join(60)
    assert stopped.returncode == 0
    assert len(results) == 8
    for r in results:
        assert isinstance(r, pb.GenerateStreamResponse), r
        assert r.finish_reason != pb.FINISH_REASON_UNSPECIFIED and r.usage.generated_tokens >= 1
    state = json.loads(podman("inspect", container).stdout)[0]["State"]
    assert state["ExitCode"] == 0, podman("logs", container).stderr[-2000:]
