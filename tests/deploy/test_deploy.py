"""deploy/ checked by the tools of each ecosystem: hadolint, kustomize, the Kubernetes schemas, promtool,
and a real Prometheus scraping a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.logs import FORMATS
from tests.service.conftest import ServerThread, config, wait_for
from tests.service.test_tracing import Receiver, receiving
from tests.test_install import self_signed

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.27"
CRDS = {
    "monitoring.coreos.com/v1",
    "serving.kserve.io/v1beta1",
    "serving.kserve.io/v1alpha1",
}  # not in the Kubernetes schemas


def tool(name: str) -> str:
    """The tool's path, from the virtual environment or PATH; skip (saying why) where it is not installed."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed here (make test installs it where the package registries allow)")
    return found


def kustomize(path: str) -> list[dict[str, Any]]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


# --- containers ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    out = subprocess.run([tool("hadolint"), str(DEPLOY / "docker" / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_run_the_server_as_a_non_root_user_with_a_health_check(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    assert text.count("\nFROM ") >= 1 and " AS build" in text  # multi-stage
    assert "USER 10001" in text and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["attnserve", "serve"]' in text
    assert "torch" not in text.lower().replace("pytorch", "")


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["base", "overlays/cpu", "overlays/gpu"])
def test_kustomizations_build_and_validate_against_the_schemas(path: str) -> None:
    import kubernetes_validate

    docs = kustomize(path)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
    } <= kinds
    for doc in docs:
        if doc["apiVersion"] in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def with_component(tmp_path: Path, component: str) -> list[dict[str, Any]]:
    """The cpu overlay with ``components/<component>``, built, every resource valid against the schemas."""
    import kubernetes_validate

    overlay = tmp_path / f"with-{component}"
    overlay.mkdir()
    k8s = DEPLOY / "k8s"
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(k8s / 'overlays/cpu', overlay)}\n"
        f"components:\n  - {os.path.relpath(k8s / 'components' / component, overlay)}\n"
    )
    out = subprocess.run(
        [tool("kubectl"), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        if doc["apiVersion"] not in CRDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return docs


def mounted_secret(docs: list[dict[str, Any]], volume: str) -> tuple[Path, str]:
    """Where the pod mounts the Secret volume ``volume`` (read-only, or this fails), and the Secret's name."""
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume]
    (secret,) = [v["secret"] for v in pod["volumes"] if v["name"] == volume]
    assert mount["readOnly"] and not secret.get("optional") and "subPath" not in mount  # (a subPath is never updated)
    return Path(mount["mountPath"]), secret["secretName"]


def test_the_api_keys_component_mounts_a_secret_where_the_server_reads_its_keys(tmp_path: Path) -> None:
    """An overlay that takes components/api-keys: the Secret's file mounted read-only at the path the
    server is given, and everything still valid against the schemas."""
    docs = with_component(tmp_path, "api-keys")
    keys_file = Path(by_kind(docs, "ConfigMap")["data"]["ATTNSERVE_API_KEYS_FILE"])
    assert (keys_file.parent, "attnserve-api-keys") == mounted_secret(docs, "api-keys")
    assert "ATTNSERVE_API_KEYS_FILE" not in by_kind(kustomize("overlays/cpu"), "ConfigMap")["data"]  # off by default


def test_the_tls_component_serves_a_cert_manager_secret_and_probes_the_plaintext_health_port(tmp_path: Path) -> None:
    docs = with_component(tmp_path, "tls")
    env = by_kind(docs, "ConfigMap")["data"]
    mount, secret = mounted_secret(docs, "tls")
    assert secret == "attnserve-tls"
    assert (Path(env["ATTNSERVE_TLS_CERT"]), Path(env["ATTNSERVE_TLS_KEY"])) == (mount / "tls.crt", mount / "tls.key")
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    health_port = int(env["ATTNSERVE_HEALTH_PORT"])
    assert {"name": "health", "containerPort": health_port, "protocol": "TCP"} in container["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == health_port  # the kubelet's gRPC probes speak no TLS
    assert "ATTNSERVE_TLS_CERT" not in by_kind(kustomize("overlays/cpu"), "ConfigMap")["data"]  # off by default
    cfg = ServerConfig.from_sources(None, {k: v for k, v in env.items() if not k.startswith("ATTNSERVE_TLS")})
    assert cfg.health_port == health_port  # a setting the server reads, by that name


def test_the_model_volume_component_serves_a_claim_and_looks_at_it_for_new_models(tmp_path: Path) -> None:
    docs = with_component(tmp_path, "model-volume")
    env = by_kind(docs, "ConfigMap")["data"]
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "models"]
    (claim,) = [v["persistentVolumeClaim"] for v in pod["volumes"] if v["name"] == "models"]
    assert claim == {"claimName": "attnserve-models", "readOnly": True} and mount["readOnly"]
    cfg = ServerConfig.from_sources(None, env)  # settings the server reads, by those names
    assert cfg.model_dir.parent == Path(mount["mountPath"]) and cfg.model_reload_seconds > 0
    assert not Path("/models/default").is_relative_to(mount["mountPath"])  # the image's model is not hidden
    base = by_kind(kustomize("overlays/cpu"), "ConfigMap")["data"]
    assert "ATTNSERVE_MODEL_RELOAD_SECONDS" not in base and base["ATTNSERVE_MODEL_DIR"] == "/models/default"


def _instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (DEPLOY / "docker" / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in "\n".join(lines).replace("\\\n", " ").splitlines() if i.strip()]


def test_the_two_images_differ_only_in_their_base() -> None:
    cpu, cuda = _instructions("Dockerfile.cpu"), _instructions("Dockerfile.cuda")
    varying = ("ARG BASE=", "ARG ONNXRUNTIME=", "ARG DEVICE=", "ARG VARIANT=")
    assert [i for i in cpu if not i.startswith(varying)] == [i for i in cuda if not i.startswith(varying)]
    assert "ARG ONNXRUNTIME=onnxruntime" in cpu and "ARG ONNXRUNTIME=onnxruntime-gpu" in cuda


def test_the_image_drains_within_a_plain_container_stop() -> None:
    """docker stop and podman stop send SIGTERM and kill 10 s later unless told otherwise."""
    env = {}
    for instruction in _instructions("Dockerfile.cpu"):
        if instruction.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in instruction[4:].split()))
    cfg = ServerConfig.from_sources(None, {k: v for k, v in env.items() if k.startswith("ATTNSERVE_") and "$" not in v})
    assert cfg.drain_delay_seconds + cfg.grace_seconds < 10
    assert "STOPSIGNAL SIGTERM" in _instructions("Dockerfile.cpu")


def test_kserve_declares_the_v2_grpc_protocol() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s/kserve/inferenceservice.yaml").read_text()))
    runtime = by_kind(docs, "ServingRuntime")
    service = by_kind(docs, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2" and model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    (port,) = container["ports"]
    assert port == {"name": "h2c", "containerPort": ServerConfig().port, "protocol": "TCP"}  # h2c: gRPC
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ServerConfig.from_sources(None, env).port == ServerConfig().port


def test_ports_probes_and_grace_period_agree_with_the_server() -> None:
    docs = kustomize("base")
    defaults = ServerConfig()
    env = by_kind(docs, "ConfigMap")["data"]
    cfg = ServerConfig.from_sources(None, env)
    assert (cfg.port, cfg.metrics_port) == (defaults.port, defaults.metrics_port)
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == cfg.port, probe
    assert pod["terminationGracePeriodSeconds"] > cfg.drain_delay_seconds + cfg.grace_seconds
    # vanished clients are found out, and connections are recycled so that new replicas get calls
    assert cfg.keepalive_seconds > 0 and cfg.max_connection_age_seconds > 0
    assert env["ATTNSERVE_LOG_FORMAT"] == "json" in FORMATS  # for the cluster's log pipeline
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["attnserve-headless"]["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in services["attnserve"]["spec"]["ports"]} == {cfg.port, cfg.metrics_port}
    hpa_metrics = {m["type"] for m in by_kind(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert hpa_metrics == {"Resource", "Pods"}


def test_gpu_overlay_asks_for_a_gpu_and_requires_cuda() -> None:
    docs = kustomize("overlays/gpu")
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith(":cuda")
    assert pod["nodeSelector"] and pod["tolerations"]
    env = ServerConfig.from_sources(None, by_kind(docs, "ConfigMap")["data"])
    assert env.device == "cuda" and env.require_cuda


def test_the_deployed_server_loads_only_model_directories_that_record_their_digests() -> None:
    for overlay in ("overlays/cpu", "overlays/gpu"):
        env = ServerConfig.from_sources(None, by_kind(kustomize(overlay), "ConfigMap")["data"])
        assert env.require_model_digests, overlay


# --- monitoring ---------------------------------------------------------------------------------


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "monitoring/rules.yaml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "monitoring/grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in re.findall(r"\battnserve_[a-z0-9_]+", e)}


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "monitoring/rules.yaml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "tests/rules_test.yaml"], cwd=DEPLOY / "monitoring", capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    alerts = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "monitoring/rules.yaml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "monitoring/tests/rules_test.yaml").read_text()))
    assert alerts == tested  # every alert has a test


KEY = [("authorization", "Bearer key-for-the-dashboard")]


def tls_stub(st: ServerThread) -> pb_grpc.AttnServeStub:
    """A stub for ``st``, which serves TLS with a self-signed certificate (``live``)."""
    cert = st.server.config.tls_cert
    assert cert is not None
    return pb_grpc.AttnServeStub(grpc.secure_channel(st.address, grpc.ssl_channel_credentials(cert.read_bytes())))


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Receiver, int]]:
    """An OTLP/gRPC trace receiver for the live server's spans."""
    with receiving() as served:
        yield served


@pytest.fixture(scope="module")
def live(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, collector: tuple[Receiver, int]
) -> Iterator[ServerThread]:
    """A server that has answered every kind of request, so every labelled series exists; with an
    API key named for its client, so the clients' series exist too; over TLS, so its certificate's
    expiry does; and traced, so its latencies carry exemplars."""
    directory = tmp_path_factory.mktemp("keys")
    keys = directory / "keys"
    keys.write_text("dashboard key-for-the-dashboard\n")
    cert, key, _ = self_signed(directory)
    # set, so that their series exist
    limits = {"max_calls_per_client": 64, "client_calls_per_second": 1000.0, "client_tokens_per_second": 1e6}
    traced = {"otlp_endpoint": f"http://127.0.0.1:{collector[1]}"}
    st = ServerThread(config(model_dir, api_keys_file=keys, tls_cert=cert, tls_key=key, **limits, **traced)).start()
    stub = tls_stub(st)
    stub.Encode(pb.EncodeRequest(texts=["a", "b"]), metadata=KEY)
    stub.AttentionMap(pb.AttentionMapRequest(text="the king"), metadata=KEY)
    stub.Generate(pb.GenerateRequest(prompt="The king", max_new_tokens=3), metadata=KEY)
    yield st
    st.stop()


def scrape(st: ServerThread) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{st.server.metrics_port}/metrics").read().decode()


def test_every_metric_in_the_rules_and_dashboard_is_exported(live: ServerThread) -> None:
    # a family declared with no series counts (attnserve_tls_certificate_expiration_timestamp_seconds
    # has none without TLS)
    exported = set(re.findall(r"^(?:# TYPE )?(attnserve_[a-z0-9_]+)", scrape(live), re.M))
    used = metric_names(rule_exprs() + dashboard_exprs())
    assert used, "no metric names found"
    assert used - exported == set()


def test_promtool_accepts_the_live_metrics(live: ServerThread) -> None:
    out = subprocess.run([tool("promtool"), "check", "metrics"], input=scrape(live), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(port: int, expr: str) -> list[Any]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_a_real_prometheus_scrapes_the_server_and_every_dashboard_query_has_data(
    live: ServerThread, collector: tuple[Receiver, int], tmp_path: Path
) -> None:
    prometheus = tool("prometheus")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "monitoring/rules.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "attnserve",
                        "static_configs": [{"targets": [f"127.0.0.1:{live.server.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--enable-feature=exemplar-storage",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        stub = tls_stub(live)
        deadline = time.monotonic() + 60
        while True:  # load while Prometheus takes a few scrapes
            stub.Encode(pb.EncodeRequest(texts=["the king speaks"]), metadata=KEY)
            stub.AttentionMap(pb.AttentionMapRequest(text="the crown"), metadata=KEY)
            with pytest.raises(grpc.RpcError):  # and a client error, so the error panels have a series
                stub.Encode(pb.EncodeRequest(), metadata=KEY)
            for _ in stub.GenerateStream(pb.GenerateRequest(prompt="Good sir", max_new_tokens=4), metadata=KEY):
                pass
            try:
                if (
                    query(port, 'up{job="attnserve"}')
                    and len(query(port, "attnserve_tokens_total[10s]")[0]["values"]) >= 4
                ):
                    break
            except (OSError, IndexError, KeyError):
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.3)
        empty = [e for e in dashboard_exprs() if not query(port, e.replace("$__rate_interval", "15s"))]
        assert empty == []
        assert query(port, "attnserve:requests:rate5m")  # the recording rules evaluate on real data
        # the latencies' exemplars, kept by Prometheus, name the traces the collector was sent
        now = time.time()
        args = {"query": "attnserve_request_duration_seconds_bucket", "start": now - 600, "end": now + 60}
        url = f"http://127.0.0.1:{port}/api/v1/query_exemplars?" + urllib.parse.urlencode(args)
        found = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]
        linked = {e["labels"]["trace_id"] for series in found for e in series["exemplars"]}
        assert linked  # (the latest calls' spans may be on their way: the SDK exports every 5 s)
        assert wait_for(lambda: linked <= {span.trace_id.hex() for span in list(collector[0].spans)}, 15)
    finally:
        proc.terminate()
        proc.wait(10)
