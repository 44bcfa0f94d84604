"""The server's TLS certificate, key and client CA, read again as their files change.

gRPC asks for the server's certificate configuration before each new connection's handshake
(``grpc.dynamic_ssl_server_credentials``); ``Certificates.fetch`` answers with a new one only when
the files changed (a stat of each: ~microseconds a connection), so that a certificate renewed in
place (cert-manager's Secret, which the kubelet updates in the mounted volume) is served from the
next connection on, with no restart. Connections open keep the certificate they began with
(``max_connection_age_seconds`` ends them in time).

Files that changed into what cannot be served (unreadable, not PEM, a key that is not the
certificate's) are refused with their reason, said once in the log and by ``on_rejected``, and
the certificate before is served meanwhile. Each is checked with Python's ``ssl`` as a TLS server
would load it, before gRPC is given it.

When the certificate taken expires, and the client CA's, is read with ``cryptography`` as the files
are taken, and given to the scrape by ``Expiry``, which looks at the files first: a certificate
renewed in place shows there before any connection comes, so an alert on it does not fire for files
that were renewed while the server had no new connection. A certificate past its end is served
(its clients say why they refuse it) and said in the log as it is taken.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class Certificates:
    def __init__(
        self, cert: Path, key: Path, client_ca: Path | None, on_rejected: Callable[[bool], None] = lambda _: None
    ) -> None:
        self.paths = (cert, key, client_ca)
        self.on_rejected = on_rejected  # told True when changed files are refused, False when files are taken
        self._lock = threading.Lock()  # gRPC may ask from several of its threads, and the scrape
        self._seen = self._stamp()
        # when the certificate taken expires ("cert": the earliest of its chain) and the client CA
        # ("client_ca"), as Unix times
        self.expires: dict[str, float] = {}
        self.initial = self._load()  # at start, files that cannot be served end the start (ValueError)
        self._taken: grpc.ServerCertificateConfiguration | None = None  # taken since gRPC last asked

    def _stamp(self) -> tuple[tuple[int, int, int] | str, ...]:
        """What says a file changed: its modification time, size and inode (through links, as a
        mounted Secret's are), or why it cannot be read."""
        stamps: list[tuple[int, int, int] | str] = []
        for path in self.paths:
            if path is None:
                continue
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError as e:
                stamps.append(e.strerror or str(e))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC takes them, checked first; ValueError says why they cannot be served."""
        cert, key, client_ca = self.paths
        try:
            pem = cert.read_bytes(), key.read_bytes(), client_ca.read_bytes() if client_ca else None
        except OSError as e:
            raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"{cert} and {key} are not a certificate and its key ({e})") from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cafile=client_ca)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"{client_ca} is not a CA certificate ({e})") from None
        expires = {"cert": expiration(pem[0], cert)}
        if client_ca is not None and pem[2] is not None:
            expires["client_ca"] = expiration(pem[2], client_ca)
        self.expires = expires
        return grpc.ssl_server_certificate_configuration([(pem[1], pem[0])], root_certificates=pem[2])

    def refresh(self) -> None:
        """Take the files again where they changed and can be served (gRPC gets them as the next
        connection comes); where they cannot, say why and keep the certificate before."""
        with self._lock:
            stamp = self._stamp()
            if stamp == self._seen:
                return
            self._seen = stamp
            try:
                self._taken = self._load()
            except ValueError as e:
                log.error("TLS certificate not taken, the one before is still served: %s", e)
                self.on_rejected(True)
                return
            log.info("TLS certificate read again from %s: served from the next connection on", self.paths[0])
            self.on_rejected(False)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """For gRPC, before each new connection's handshake: the files taken since it last asked, else
        None (the certificate before stays)."""
        self.refresh()
        with self._lock:
            taken, self._taken = self._taken, None
            return taken

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self._fetch_safely, require_client_authentication=self.paths[2] is not None
        )

    def _fetch_safely(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            return self.fetch()
        except Exception:  # a fault of its own must not end gRPC's handshake: the certificate before stays
            log.exception("reading the TLS certificate again failed; the one before is still served")
            return None


def expiration(pem: bytes, path: Path) -> float:
    """When the earliest of the certificates in ``pem`` (read from ``path``) expires, as a Unix time;
    one already past its end is said in the log."""
    try:
        ends = [c.not_valid_after_utc for c in x509.load_pem_x509_certificates(pem)]
    except ValueError as e:
        raise ValueError(f"{path} holds a certificate that cannot be read ({e})") from None
    end = min(ends)
    if end < datetime.now(UTC):
        log.warning("TLS certificate in %s expired at %s: clients will refuse it", path, f"{end:%Y-%m-%d %H:%M:%S} UTC")
    return end.timestamp()


class Expiry:
    """``attnserve_tls_certificate_expiration_timestamp_seconds`` for the scrape, the files looked at
    first (a stat each); declared with no series where the server has no TLS."""

    def __init__(self, certificates: Certificates | None) -> None:
        self.certificates = certificates

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "attnserve_tls_certificate_expiration_timestamp_seconds",
            "When the TLS certificate a new connection is served expires (file=cert, the earliest of its "
            "chain) and the client CA it trusts (file=client_ca), as Unix times",
            labels=["file"],
        )
        if self.certificates is not None:
            self.certificates.refresh()
            for file, when in sorted(self.certificates.expires.items()):
                family.add_metric([file], when)
        yield family
