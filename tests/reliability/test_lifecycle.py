"""Shutdown, start-up on a broken model directory, floods, cancellation storms, and failures inside
the server: every call the server took is answered, and health tells the truth throughout."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.timing import device_flags, start_server
from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from tests.reliability.conftest import SERVING, health
from tests.service.conftest import ServerThread, config, mount_secret
from tests.service.test_server import metrics, reason


def code_of(future: Any) -> grpc.StatusCode:
    try:
        future.result()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@pytest.fixture
def stopped_later() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- SIGTERM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", ["0", "1"])
def test_calls_accepted_just_before_sigterm_are_served_or_refused_never_cut_off(
    model_dir: Path, stopped_later: list[subprocess.Popen[str]], delay: str
) -> None:
    proc, port = start_server(model_dir, "--drain-delay-seconds", delay, "--grace-seconds", "20")
    stopped_later.append(proc)
    stub = pb_grpc.AttnServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    assert stub.Encode(pb.EncodeRequest(texts=["warm"]), timeout=10).embeddings  # the channel is connected
    futures = [stub.Encode.future(pb.EncodeRequest(texts=[f"call {i}"] * 4), timeout=30) for i in range(80)]
    time.sleep(0.029)
    proc.send_signal(signal.SIGTERM)
    codes = Counter(code_of(f) for f in futures)
    assert proc.wait(40) == 0
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    if delay != "0":  # still serving during the delay: every call is answered
        assert codes == {grpc.StatusCode.OK: 80}


ON_EITHER = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


@ON_EITHER
def test_sigterm_under_mixed_load_loses_nothing(
    model_dir: Path, stopped_later: list[subprocess.Popen[str]], device: str
) -> None:
    flags = device_flags(device, "fp32")
    proc, port = start_server(model_dir, *flags, "--drain-delay-seconds", "0", "--max-queue-delay-ms", "50")
    stopped_later.append(proc)
    stub = pb_grpc.AttnServeStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    gen = pb.GenerateRequest(prompt="The king", max_new_tokens=40, temperature=0.0)
    streams = [stub.GenerateStream(gen, timeout=60) for _ in range(8)]
    firsts = [next(s) for s in streams]  # every stream is running
    unary = [stub.Generate.future(gen, timeout=60) for _ in range(4)]
    encodes = [stub.Encode.future(pb.EncodeRequest(texts=["a", "b c"]), timeout=60) for _ in range(20)]
    maps = [stub.AttentionMap.future(pb.AttentionMapRequest(text="the crown"), timeout=60) for _ in range(5)]
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    for first, s in zip(firsts, streams, strict=True):
        messages = [first, *s]  # a client that lags gets several tokens a message, maybe all in the first
        assert messages[-1].finish_reason and messages[-1].usage.generated_tokens == 40
        assert sum(len(m.tokens) for m in messages) == 40
    codes = Counter(code_of(f) for f in [*unary, *encodes, *maps])
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes[grpc.StatusCode.OK] >= 1
    assert proc.wait(40) == 0


def test_a_second_signal_exits_at_once(model_dir: Path, stopped_later: list[subprocess.Popen[str]]) -> None:
    proc, port = start_server(model_dir, "--drain-delay-seconds", "60")
    stopped_later.append(proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # draining: still up
    assert health(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.NOT_SERVING
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 1 and time.monotonic() - t0 < 5


# --- start-up on a broken model directory -------------------------------------------------------


def _break_config(d: Path) -> str:
    (d / "config.json").write_text('{"format": 1, "name": ')
    return "config.json: not valid JSON"


def _truncate_graph(d: Path) -> str:
    data = (d / "encode.onnx").read_bytes()
    (d / "encode.onnx").write_bytes(data[: len(data) // 3])
    return f"encode.onnx: {len(data) // 3} bytes, where export wrote {len(data)} (cut short or changed since)"


def _remove_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").unlink()
    return "tokenizer.json: missing"


def _garble_tokenizer(d: Path) -> str:
    size = (d / "tokenizer.json").stat().st_size
    (d / "tokenizer.json").write_text("not a tokenizer")
    return f"tokenizer.json: 15 bytes, where export wrote {size}"


def _remove_graph(d: Path) -> str:
    (d / "decoder.onnx").unlink()
    return "decoder.onnx: missing"


@pytest.mark.parametrize(
    "damage", [_break_config, _truncate_graph, _remove_tokenizer, _garble_tokenizer, _remove_graph]
)
def test_a_broken_model_directory_fails_start_up_naming_the_file(model_dir: Path, tmp_path: Path, damage: Any) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    needle = damage(broken)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model-dir", str(broken), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "-1", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen: list[int] = []
    port = None
    lines = []
    for line in proc.stderr:  # the port opens first (NOT_SERVING) while the model loads
        lines.append(line)
        if port is None and (m := re.search(r"gRPC on \S+:(\d+)", line)):
            port = int(m.group(1))
            with contextlib.suppress(grpc.RpcError):  # gone already
                seen.append(health(f"127.0.0.1:{port}", timeout=2))
    assert proc.wait(30) == 2
    err = "".join(lines)
    assert needle in err and str(broken) in err, err
    assert SERVING not in seen


# --- floods, cancellation storms ----------------------------------------------------------------


def test_a_flood_is_refused_at_once_and_nothing_is_cut_off(model_dir: Path) -> None:
    # batches wait 100 ms to fill, so calls pile up faster than they are served
    cfg = config(model_dir, max_concurrent_calls=24, max_queue_size=48, max_batch_size=64, max_queue_delay_ms=100)
    st = ServerThread(cfg).start()
    try:
        stub = st.stub()
        request = pb.EncodeRequest(texts=["the king speaks of the crown"] * 4)
        futures = [stub.Encode.future(request, timeout=30) for _ in range(400)]
        probes = [health(st.address, timeout=1.0) for _ in range(5)]
        codes = Counter(code_of(f) for f in futures)
        assert probes == [SERVING] * 5
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert stub.Encode(request, timeout=10).embeddings
        after = metrics(st)
        assert after[("attnserve_calls_in_progress", ())] == 0
        assert after[("attnserve_queue_depth", (("graph", "encode"),))] == 0
        refused = ("attnserve_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("rpc", "Encode")))
        assert after[refused] == codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
    finally:
        st.stop()


@ON_EITHER
def test_a_cancellation_storm_leaves_nothing_behind(model_dir: Path, device: str) -> None:
    """Slots freed by cancelled streams (on CUDA, slots of the cache on the device) are reused cleanly:
    the same seeded request generates the same tokens after the storm as before it."""
    st = ServerThread(config(model_dir, max_waiting_sequences=128, device=device, require_cuda=device == "cuda"))
    st.start()
    try:
        stub = st.stub()
        rng = random.Random(0)
        request = pb.GenerateRequest(prompt="The king", max_new_tokens=50, temperature=0.8, seed=1)
        before = [t.token_id for t in stub.Generate(request, timeout=30).tokens]

        def storm(i: int) -> None:
            call = stub.GenerateStream(request, timeout=60)
            n = rng.randrange(0, 12)
            if n == 0:
                time.sleep(rng.random() * 0.01)  # some go before their first token
            else:
                for _, _ in zip(range(n), call, strict=False):
                    pass
            call.cancel()

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(storm, range(100)))
        gauges = {
            ("attnserve_generate_running_sequences", ()): 0,
            ("attnserve_generate_waiting_sequences", ()): 0,
            ("attnserve_calls_in_progress", ()): 0,
        }
        stop_at = time.monotonic() + 10
        while {k: metrics(st)[k] for k in gauges} != gauges:
            assert time.monotonic() < stop_at, {k: metrics(st)[k] for k in gauges}
            time.sleep(0.05)
        assert not st.server.scheduler.running and not st.server.scheduler.waiting  # type: ignore[union-attr]
        whole = stub.Generate(request, timeout=30)
        assert [t.token_id for t in whole.tokens] == before and health(st.address) == SERVING
    finally:
        st.stop()


# --- failures inside the generation loop --------------------------------------------------------


def test_a_failure_handing_out_a_token_fails_that_sequence_only(model_dir: Path) -> None:
    st = ServerThread(config(model_dir)).start()
    try:
        scheduler = st.server.scheduler
        assert scheduler is not None
        real = scheduler._text
        failed = threading.Event()

        def flaky(seq: Any) -> str:
            if seq.params.seed == 13 and not failed.is_set():
                failed.set()
                raise ValueError("detokenizer broke")
            return real(seq)

        scheduler._text = flaky  # type: ignore[method-assign]
        stub = st.stub()
        ok = [stub.Generate.future(pb.GenerateRequest(prompt="My lord", max_new_tokens=20, seed=s)) for s in (1, 2)]
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt="The queen", max_new_tokens=20, seed=13), timeout=30)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "detokenizer" not in e.value.details()
        assert all(f.result(30).usage.generated_tokens >= 1 for f in ok)
        again = stub.Generate(pb.GenerateRequest(prompt="The queen", max_new_tokens=5, seed=13), timeout=30)
        assert again.usage.generated_tokens >= 1
        assert health(st.address) == SERVING
    finally:
        st.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the loop's death, on purpose
def test_if_the_generation_loop_dies_health_says_so_and_calls_fail_rather_than_hang(model_dir: Path) -> None:
    st = ServerThread(config(model_dir)).start()
    try:
        scheduler = st.server.scheduler
        assert scheduler is not None
        stub = st.stub()
        # as if its model had been loaded anew for this a moment ago, so that it stays down (the
        # server loads it anew otherwise: tests/service/test_reload.py)
        st.server._revived_at = time.monotonic()

        def die() -> bool:
            raise SystemExit("the loop is gone")  # past every `except Exception`

        scheduler._iterate = die  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(prompt="The king", max_new_tokens=5), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and reason(e.value) == "GENERATION_UNAVAILABLE"
        stop_at = time.monotonic() + 5
        while health(st.address) == SERVING:
            assert time.monotonic() < stop_at
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as later:
            stub.Generate(pb.GenerateRequest(prompt="The king", max_new_tokens=5), timeout=10)
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE and reason(later.value) == "GENERATION_UNAVAILABLE"
    finally:
        st.stop()


# --- TLS and mutual TLS -------------------------------------------------------------------------


def _tls_channel(address: str, certs: Path, client: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(certs / f"{client}.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(address, creds)


def test_tls(model_dir: Path, certs: Path) -> None:
    st = ServerThread(config(model_dir, tls_cert=certs / "server.pem", tls_key=certs / "server.key")).start()
    try:
        good = pb_grpc.AttnServeStub(_tls_channel(st.address, certs))
        assert good.Encode(pb.EncodeRequest(texts=["secret"]), timeout=10).embeddings
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.AttnServeStub(grpc.insecure_channel(st.address)).Encode(pb.EncodeRequest(texts=["x"]), timeout=3)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        st.stop()


def _trusting(address: str, ca: Path) -> bool:
    """Whether a new connection that trusts only ``ca`` is served (False: its handshake failed)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    # a connection of its own: gRPC shares one between channels of the same target and credentials
    with grpc.secure_channel(address, creds, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            pb_grpc.AttnServeStub(channel).Encode(pb.EncodeRequest(texts=["x"]), timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            return False
        return True


def _mount(directory: Path, cert: Path, key: Path) -> None:
    """``tls.crt`` and ``tls.key`` in ``directory`` as the kubelet mounts a TLS Secret and renews it."""
    mount_secret(directory, {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()})


def _not_after(cert: Path) -> float:
    """When ``cert`` expires, as openssl reads it (a Unix time)."""
    out = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(cert)], capture_output=True, text=True)
    return float(ssl.cert_time_to_seconds(out.stdout.strip().removeprefix("notAfter=")))


def _expiration(st: ServerThread, file: str) -> float | None:
    return metrics(st).get(("attnserve_tls_certificate_expiration_timestamp_seconds", (("file", file),)))


def test_the_certificate_served_says_when_it_expires(
    model_dir: Path, certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """attnserve_tls_certificate_expiration_timestamp_seconds: when the certificate the server would
    serve a new connection expires, and the client CA it trusts; read again by each scrape, so a
    renewal is seen before any connection comes, and an alert on it does not fire for files renewed."""
    renewed = tmp_path / "renewed.pem"  # the server's own request signed again, for 30 days
    sign = ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-days", "30",
            "-extfile", "san.ext", "-out", str(renewed)]  # fmt: skip
    subprocess.run(sign, cwd=certs, check=True, capture_output=True)
    mount = tmp_path / "mount"
    mount.mkdir()
    _mount(mount, certs / "server.pem", certs / "server.key")
    cfg = config(model_dir, tls_cert=mount / "tls.crt", tls_key=mount / "tls.key", tls_client_ca=certs / "ca.pem")
    st = ServerThread(cfg).start()
    try:
        assert _expiration(st, "cert") == _not_after(certs / "server.pem")
        assert _expiration(st, "client_ca") == _not_after(certs / "ca.pem")
        assert _not_after(renewed) - _not_after(certs / "server.pem") > 27 * 86400
        _mount(mount, renewed, certs / "server.key")
        assert _expiration(st, "cert") == _not_after(renewed)  # no connection since: the scrape read it
        with _tls_channel(st.address, certs, "client") as channel:  # and it is the one served
            assert pb_grpc.AttnServeStub(channel).Encode(pb.EncodeRequest(texts=["x"]), timeout=10).embeddings
        assert _expiration(st, "cert") == _not_after(renewed)
        _mount(mount, certs / "server.pem", certs / "stranger.key")  # refused: the one before is still served
        assert _expiration(st, "cert") == _not_after(renewed)
    finally:
        st.stop()
    plain = ServerThread(config(model_dir)).start()
    try:
        assert _expiration(plain, "cert") is None  # no TLS: no series
    finally:
        plain.stop()
    # a certificate that has expired is served (its clients will say why they refuse it), and said at start
    expired = tmp_path / "expired.pem"  # (openssl 3.0's x509 sets no dates in the past)
    request = x509.load_pem_x509_csr((certs / "server.csr").read_bytes())
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    dates = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)
    made = (
        x509.CertificateBuilder(request.subject, ca.subject, request.public_key(), x509.random_serial_number(), *dates)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    expired.write_bytes(made.public_bytes(serialization.Encoding.PEM))
    with caplog.at_level(logging.WARNING, "service.tls"):
        st = ServerThread(config(model_dir, tls_cert=expired, tls_key=certs / "server.key")).start()
        try:
            assert _expiration(st, "cert") == _not_after(expired)
        finally:
            st.stop()
    assert any(f"{expired} expired at 2024-02-01 00:00:00 UTC" in r.getMessage() for r in caplog.records)


def test_a_certificate_renewed_in_place_is_served_from_the_next_connection(
    model_dir: Path, certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As cert-manager renews a certificate in its Secret: new connections get the new one, with no
    restart. Files that change into a pair that does not match are refused, and the one before is served."""
    _mount(tmp_path, certs / "server.pem", certs / "server.key")
    st = ServerThread(config(model_dir, tls_cert=tmp_path / "tls.crt", tls_key=tmp_path / "tls.key")).start()
    rejected = ("attnserve_tls_certificate_rejected", ())
    try:
        with _tls_channel(st.address, certs) as before:  # a connection made before the renewal
            stub = pb_grpc.AttnServeStub(before)
            assert stub.Encode(pb.EncodeRequest(texts=["x"]), timeout=10).embeddings
            assert not _trusting(st.address, certs / "other_ca.pem")
            _mount(tmp_path, certs / "stranger.pem", certs / "stranger.key")  # renewed: signed by other_ca
            assert _trusting(st.address, certs / "other_ca.pem")
            assert not _trusting(st.address, certs / "ca.pem")
            assert stub.Encode(pb.EncodeRequest(texts=["x"]), timeout=10).embeddings  # it keeps its own
        assert metrics(st)[rejected] == 0
        with caplog.at_level(logging.INFO, "service.tls"):
            _mount(tmp_path, certs / "server.pem", certs / "stranger.key")  # a key not the certificate's
            assert _trusting(st.address, certs / "other_ca.pem")  # the one before, still served
            assert metrics(st)[rejected] == 1
            assert any("are not a certificate and its key" in r.getMessage() for r in caplog.records)
            _mount(tmp_path, certs / "server.pem", certs / "server.key")  # mended
            assert _trusting(st.address, certs / "ca.pem")
            assert metrics(st)[rejected] == 0
    finally:
        st.stop()


def test_a_certificate_that_cannot_be_served_ends_the_start_saying_why(model_dir: Path, certs: Path) -> None:
    for cert, key, says in (
        (certs / "server.pem", certs / "stranger.key", "are not a certificate and its key"),
        (certs / "server.pem", certs / "missing.key", "cannot read .*missing.key: No such file"),
    ):
        st = ServerThread(config(model_dir, tls_cert=cert, tls_key=key))
        with pytest.raises(ValueError, match=says):
            st.start()
        st.stop(grace=0)  # as serve does after a failed start: the metrics port closes


def test_the_health_port_answers_probes_in_plaintext_beside_a_tls_port(model_dir: Path, certs: Path) -> None:
    """The kubelet's gRPC probes speak no TLS: health alone, in plaintext, on a port of its own, saying
    what the TLS port's health says, through the drain too; nothing else is served there."""
    cfg = config(
        model_dir,
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
        health_port=0,
        drain_delay_seconds=1.0,
    )
    st = ServerThread(cfg).start()
    plain = f"127.0.0.1:{st.server.health_port}"
    try:
        assert st.server.health_port not in (0, st.server.port)
        assert health(plain) == SERVING
        with grpc.insecure_channel(plain) as channel:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.AttnServeStub(channel).Encode(pb.EncodeRequest(texts=["x"]), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == SERVING
            stopping = threading.Thread(target=st.stop, kwargs={"grace": 5})
            stopping.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # the drain, seen there too
            assert health(plain) == health_pb2.HealthCheckResponse.NOT_SERVING
            stopping.join(20)
    finally:
        st.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(model_dir: Path, certs: Path) -> None:
    cfg = config(model_dir, tls_cert=certs / "server.pem", tls_key=certs / "server.key", tls_client_ca=certs / "ca.pem")
    st = ServerThread(cfg).start()
    try:
        ok = pb_grpc.AttnServeStub(_tls_channel(st.address, certs, "client"))
        assert ok.Encode(pb.EncodeRequest(texts=["secret"]), timeout=10).embeddings
        for client in (None, "stranger"):  # no certificate; one from another CA
            with pytest.raises(grpc.RpcError) as e:
                stub = pb_grpc.AttnServeStub(_tls_channel(st.address, certs, client))
                stub.Encode(pb.EncodeRequest(texts=["x"]), timeout=3)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, client
        cli = [sys.executable, "-m", "service.cli", "client", "--address", st.address,
               "--tls-ca", str(certs / "ca.pem"),
               "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        out = subprocess.run([*cli, "health"], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        out = subprocess.run([*cli, "encode", "hello"], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0 and "32 dims" in out.stdout, out.stderr
        no_cert = subprocess.run([*cli[:8], "health"], capture_output=True, text=True, timeout=60, env=env)
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
        # a container's HEALTHCHECK: no flags, the server's port and the client's TLS from the environment
        probe_env = {
            **env,
            "ATTNSERVE_PORT": str(st.server.port),
            "ATTNSERVE_CLIENT_TLS_CA": str(certs / "ca.pem"),
            "ATTNSERVE_CLIENT_TLS_CERT": str(certs / "client.pem"),
            "ATTNSERVE_CLIENT_TLS_KEY": str(certs / "client.key"),
        }
        probe = [sys.executable, "-m", "service.cli", "client", "--timeout", "5", "health"]
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=probe_env)
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        wrong_port = {**probe_env, "ATTNSERVE_PORT": "1"}
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=wrong_port)
        assert out.returncode == 1
    finally:
        st.stop()
