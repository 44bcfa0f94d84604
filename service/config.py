"""Server settings: every one from a flag, else an ``ATTNSERVE_<NAME>`` environment variable,
else its default; validated once, when the config is built. Importing this module is cheap (the
command line builds its parser from it)."""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.batcher import BatchLimits
    from service.runtime import RuntimeOptions
    from service.scheduler import GenerationLimits
    from service.servicer import RequestLimits

ENV_PREFIX = "ATTNSERVE_"

# The priorities a call's work may have, highest first, by the index the queues use: a batch is formed
# from the highest with work queued, and a generation's free slot goes to it, first come first served
# within each. A call asks for one (attnserve.v1's Priority, Triton's "priority" parameter, 1 the
# highest); NORMAL where it asks none and its client's line in the keys file sets none.
PRIORITIES = ("high", "normal", "low")
HIGH, NORMAL, LOW = range(len(PRIORITIES))


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path = Path("models/default/onnx")
    host: str = "[::]"
    port: int = 50051  # 0 picks a free port (logged)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8000  # 0 picks a free port; -1 turns the endpoint off
    # a second gRPC port, on host, plaintext whatever the first's TLS, serving only health: the
    # kubelet's gRPC probes speak no TLS (0 picks a free port; -1, off)
    health_port: int = -1
    device: str = "auto"  # auto | cpu | cuda
    require_cuda: bool = False
    device_id: int = 0
    cuda_mem_limit_bytes: int = 0
    intra_op_threads: int = 0
    variant: str = "fp32"  # fp32 | int8 | fp16
    ort_spin: bool = False  # ONNX Runtime threads spinning between runs starve the event loop
    step_threads: int = 1  # generation's CPU decode steps: one thread, woken for nothing (0 = intra_op_threads)
    # refuse a model directory whose config.json records no file digests (exported before they were,
    # or with the record taken out), at start and on a reload, rather than load its files unchecked
    require_model_digests: bool = False
    max_batch_size: int = 32
    # padded tokens a batch holds; 0: chosen for the device the model runs on (see batch_limits)
    max_batch_tokens: int = 0
    max_queue_delay_ms: float = 0.0  # 0: take what is queued when the model is free (see service.batcher)
    max_queue_size: int = 1024  # texts waiting per graph; beyond it, RESOURCE_EXHAUSTED at once
    max_queue_tokens: int = 65536  # their tokens, summed
    max_batches_in_flight: int = 2  # per batcher: the next batch starts while the last one's results go out
    max_texts_per_request: int = 64
    max_text_bytes: int = 256 * 1024  # one text; only a prefix of a text longer than the context is tokenized
    max_request_bytes: int = 1024 * 1024  # all texts of one request (also bounds a request message's size)
    # attention maps being computed or sent, all calls together; beyond it, RESOURCE_EXHAUSTED at once
    max_attention_bytes: int = 128 * 1024 * 1024
    max_concurrent_calls: int = 256  # calls in progress; beyond it, RESOURCE_EXHAUSTED at once
    # health's Watch and reflection's streams open at once (each holds memory while its client keeps
    # it): beyond it, RESOURCE_EXHAUSTED; health's Check is answered whatever. Also, apart, health
    # Checks (and the v2 service's liveness, readiness and metadata calls) whose requests have not
    # come: beyond it, the one waiting longest is refused
    max_probe_streams: int = 1024
    batch_nice: int = 10  # Encode/AttentionMap batch threads run this much below the event loop (0: same)
    max_running_sequences: int = 16  # generation: sequences decoded together
    max_cached_tokens: int = 4096  # generation: prompt + max_new_tokens reserved by running sequences, summed
    max_waiting_sequences: int = 64  # generation: beyond this, RESOURCE_EXHAUSTED
    max_new_tokens: int = 256
    stream_interval: int = 1  # generation: tokens a stream message gathers before it is sent
    max_message_bytes: int = 16 * 1024 * 1024
    # on SIGTERM: health says NOT_SERVING at once, calls are still served this long (for load balancers
    # to see it), then new calls are refused with UNAVAILABLE and those in progress get grace_seconds
    drain_delay_seconds: float = 2.0
    grace_seconds: float = 20.0
    # HTTP/2 pings find the clients that vanished without closing their connection (a host gone, a
    # network cut, a NAT that forgot it): one that does not answer within keepalive_timeout_seconds is
    # closed and its calls are cancelled, giving back their places (0: no pings; gRPC's own is 2 hours)
    keepalive_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0
    # a connection that has not finished its handshake (TLS's, and HTTP/2's preface and settings) in
    # this long is closed: clients send theirs at once, and gRPC's own wait, 2 minutes, let a peer
    # that opened connections and sent nothing hold a descriptor each for that long
    handshake_timeout_seconds: float = 10.0
    # a call whose request (the first, on reflection's stream) has not come whole within this long of
    # the call opening is answered DEADLINE_EXCEEDED, giving back its place: left open with nothing
    # sent, it held its place until the client closed the connection. Also, at a full server a call
    # that has waited a second for its request gives its place to one that comes (and so does a v2
    # stream with no request in progress, which is not timed out: its client may open it long before
    # it has a request)
    request_read_timeout_seconds: float = 30.0
    # connections are closed (GOAWAY, their calls given grace_seconds) after this long, so that clients
    # reconnect and spread over the replicas behind a connection-level load balancer (0: never)
    max_connection_age_seconds: float = 0.0
    # a connection with no call in progress for this long is closed (GOAWAY; its client reconnects when
    # it next calls), so that clients that hold idle channels hold no descriptor and buffers here (0: never)
    max_connection_idle_seconds: float = 0.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # given: clients must present a certificate signed by it (mutual TLS)
    # API keys, one a line, each after the name of the client it is for where it has one ("alice
    # <key>"; blank lines and lines starting with # skipped; several, so that a key can be replaced
    # without a moment when neither works): given, every call to the model's services must
    # carry "authorization: Bearer <one of them>", or is answered UNAUTHENTICATED; health, reflection
    # and the v2 service's liveness, readiness and metadata stay open to probes. Keys travel in the
    # clear without TLS. A key may be given as its SHA-256 ("sha256:<64 hex digits>", HASHED_KEY), so
    # that the file holds none a client could use. A named client's line may end with limits of its
    # own, in place of the server's below for it alone, and the priority of its calls ("batch <key>
    # calls_per_second=0 tokens_per_second=50000 priority=low"; CLIENT_LIMITS), which change with
    # the file as its keys do
    api_keys_file: Path | None = None
    # the keys file is looked at this often and, where it changed, read again: the keys in it replace
    # those before, and a file that cannot be read or holds no key leaves those before in place and is
    # logged (0: only on SIGHUP, which reads it again too). A Kubernetes Secret mounted as a volume is
    # updated in place, so a key is added or retired without a restart
    api_keys_reload_seconds: float = 10.0
    # the model directory is looked at this often (0: only on SIGHUP, which looks too) and, where it
    # changed and then stays the same for a second, loaded and warmed up beside the model serving: the
    # calls that begin from then are served by it, those in progress end on the one before, which is
    # stopped after the last. One that cannot be loaded leaves the model before serving, and is logged.
    # Replace a directory whole (a link swapped, as Kubernetes swaps a volume's): one copied over file
    # by file may be looked at between two of them
    model_reload_seconds: float = 0.0
    # a stream (GenerateStream, ModelStreamInfer) whose client takes none of its messages for this long
    # (gRPC waits to send one as long as the client's window is full: a client that stopped reading with
    # its connection alive) is ended DEADLINE_EXCEEDED, which the client reads after the messages it has
    # not read, and gives back its places of max_concurrent_calls and of its client's (0: never; it
    # lasts as the call does)
    stream_write_timeout_seconds: float = 30.0
    # calls in progress one client (the name before its keys; the keys with none are one client,
    # "unnamed") may have; beyond it, its calls are refused RESOURCE_EXHAUSTED while others' are served,
    # so that one client cannot take every place of max_concurrent_calls (0: no limit of its own)
    max_calls_per_client: int = 0
    # calls one client may open a second on average (a token bucket of client_burst calls, filled at
    # this rate); past it, its calls are refused RESOURCE_EXHAUSTED with grpc-retry-pushback-ms, the
    # milliseconds until its next would be taken, which gRPC clients with a retry policy wait for in
    # place of their own backoff. A stream counts once, as it opens (0: no rate of its own)
    client_calls_per_second: float = 0.0
    client_burst: int = 0  # calls a client that has been quiet may open at once; 0: one second's, at least 1
    # tokens the model may read and generate for one client a second on average (those that
    # attnserve_client_tokens_total counts: Encode's and AttentionMap's texts, generation's prompts and
    # what it generated), from a bucket of client_token_burst filled at this rate. A call is taken
    # while its client's bucket holds any; what it uses is taken as it is counted (a generation's as it
    # ends), so a client's calls in progress may take it below empty, and its calls are then refused
    # RESOURCE_EXHAUSTED with grpc-retry-pushback-ms until it has filled back (0: no rate of its own)
    client_tokens_per_second: float = 0.0
    client_token_burst: int = 0  # the bucket's size in tokens; 0: one second's, at least 1
    # one record a call to the model's services answered, at INFO from the logger attnserve.access: its
    # method, status code, time to answer, caller and x-request-id, and what a call not answered OK was
    # told (health and reflection are not recorded); ~25 us of the server's CPU a call as text, ~40 as JSON
    # (bench observe)
    access_log: bool = False
    # with access_log: a record only for the calls not answered OK, so that a busy server logs the
    # ones worth a look (each with its reason) and spends nothing on the others
    access_log_errors_only: bool = False
    # an OpenTelemetry collector's OTLP/gRPC address (http://host:4317; https:// for TLS): each call to
    # the model's services is traced there, a span with its queue and compute (service.tracing). Off
    # where empty
    otlp_endpoint: str = ""
    # of the traces the server starts (calls with no traceparent), the share sampled; a caller's
    # decision is kept whatever it is
    trace_sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if not 0 <= self.port <= 65535 or not -1 <= self.metrics_port <= 65535 or not -1 <= self.health_port <= 65535:
            raise ValueError(f"ports must be in 0..65535, got {self.port}, {self.metrics_port} and {self.health_port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS first")
        if self.grace_seconds < 0 or self.drain_delay_seconds < 0:
            raise ValueError("grace_seconds and drain_delay_seconds must be >= 0")
        if (
            self.keepalive_seconds < 0
            or self.keepalive_timeout_seconds <= 0
            or self.max_connection_age_seconds < 0
            or self.max_connection_idle_seconds < 0
        ):
            raise ValueError(
                "keepalive_seconds, max_connection_age_seconds and max_connection_idle_seconds must be >= 0, "
                "keepalive_timeout_seconds > 0"
            )
        if self.max_calls_per_client < 0:
            raise ValueError(f"max_calls_per_client must be >= 0, got {self.max_calls_per_client}")
        if self.max_calls_per_client and self.api_keys_file is None:
            raise ValueError("max_calls_per_client needs api_keys_file: clients are told apart by their keys")
        for rate, burst in (
            ("client_calls_per_second", "client_burst"),
            ("client_tokens_per_second", "client_token_burst"),
        ):
            if getattr(self, rate) < 0 or getattr(self, burst) < 0:
                given = f"{getattr(self, rate)} and {getattr(self, burst)}"
                raise ValueError(f"{rate} must be >= 0 and {burst} must be >= 0, got {given}")
            if getattr(self, rate) and self.api_keys_file is None:
                raise ValueError(f"{rate} needs api_keys_file: clients are told apart by their keys")
            if getattr(self, burst) and not getattr(self, rate):
                raise ValueError(f"{burst} needs {rate}: it is the rate's bucket")
        if self.access_log_errors_only and not self.access_log:
            raise ValueError("access_log_errors_only needs access_log: it says which calls the access log records")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio must be in 0..1, got {self.trace_sample_ratio}")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint is http://host:port or https://host:port, got {self.otlp_endpoint!r}")
        for reload in ("api_keys_reload_seconds", "model_reload_seconds", "stream_write_timeout_seconds"):
            if getattr(self, reload) < 0:
                raise ValueError(f"{reload} must be >= 0, got {getattr(self, reload)}")
        if self.handshake_timeout_seconds <= 0 or self.request_read_timeout_seconds <= 0:
            raise ValueError(
                "handshake_timeout_seconds and request_read_timeout_seconds must be > 0, got "
                f"{self.handshake_timeout_seconds} and {self.request_read_timeout_seconds}"
            )
        if not 0 <= self.batch_nice <= 19:
            raise ValueError(f"batch_nice must be in 0..19, got {self.batch_nice}")
        if self.max_message_bytes < 1024 or self.max_concurrent_calls < 1 or self.max_probe_streams < 1:
            raise ValueError("max_message_bytes must be >= 1024, max_concurrent_calls and max_probe_streams >= 1")
        self.api_keys  # noqa: B018 (read now: the file is there and holds keys)
        self.client_limits  # noqa: B018 (and the limits it sets are ones)
        self.runtime_options()  # validates device and variant
        self.batch_limits()
        self.generation_limits()
        self.request_limits()

    @functools.cached_property
    def api_keys(self) -> dict[str, str] | None:
        """The keys in ``api_keys_file``, each to the name of its client ("" where it has none), or None
        where there is none to check: read as the config is built (the server reads the file again as
        it changes, ``read_api_keys``)."""
        return None if self.api_keys_file is None else read_api_keys(self.api_keys_file)

    @functools.cached_property
    def client_limits(self) -> dict[str, dict[str, float]]:
        """The limits of each client whose lines in ``api_keys_file`` set its own (``read_keys_file``)."""
        return {} if self.api_keys_file is None else read_keys_file(self.api_keys_file)[1]

    def request_limits(self) -> RequestLimits:
        from service.servicer import RequestLimits

        return RequestLimits(
            self.max_texts_per_request, self.max_text_bytes, self.max_request_bytes, self.max_attention_bytes
        )

    def runtime_options(self) -> RuntimeOptions:
        from service.runtime import RuntimeOptions

        return RuntimeOptions(
            device=self.device,  # type: ignore[arg-type]
            require_cuda=self.require_cuda,
            device_id=self.device_id,
            cuda_mem_limit_bytes=self.cuda_mem_limit_bytes,
            intra_op_threads=self.intra_op_threads,
            variant=self.variant,  # type: ignore[arg-type]
            spin=self.ort_spin,
            step_threads=self.step_threads,
            require_digests=self.require_model_digests,
        )

    def batch_limits(self, cuda: bool = False, threads: int = 1) -> BatchLimits:
        """The batchers' limits for a model on CUDA, or on the CPU with ``threads`` intra-op threads."""
        from service.batcher import BatchLimits, default_batch_tokens

        return BatchLimits(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens or default_batch_tokens(cuda, threads),
            max_queue_delay_s=self.max_queue_delay_ms / 1000.0,
            max_queue_size=self.max_queue_size,
            max_queue_tokens=self.max_queue_tokens,
            max_in_flight=self.max_batches_in_flight,
        )

    def generation_limits(self) -> GenerationLimits:
        from service.scheduler import GenerationLimits

        return GenerationLimits(
            max_running=self.max_running_sequences,
            max_cached_tokens=self.max_cached_tokens,
            max_waiting=self.max_waiting_sequences,
            max_new_tokens=self.max_new_tokens,
            stream_interval=self.stream_interval,
        )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = ENV_PREFIX + f.name.upper()
            if hints[f.name] is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(env {env})")
            else:
                parser.add_argument(flag, default=None, help=f"default {f.default} (env {env})")

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, env: typing.Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Flags first, then ATTNSERVE_* variables, then the config file (``--config``,
        ATTNSERVE_CONFIG; ``read_config_file``), then defaults."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        path = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG")
        values: dict[str, Any] = read_config_file(Path(path)) if path else {}
        for f in fields(cls):
            raw = getattr(args, f.name, None) if args is not None else None
            if raw is None:
                raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(raw, hints[f.name], f.name)
        return cls(**values)


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a TOML file gives, by their names (``port = 50051``, ``api_keys_file = "keys"``):
    each of the type its setting has, a path relative to the file's own folder, no name that is not
    a setting. ValueError says what is wrong, naming the setting."""
    try:
        with path.open("rb") as f:
            given = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config: {path} is not TOML: {e}") from None
    hints = typing.get_type_hints(ServerConfig)
    unknown = sorted(given.keys() - hints.keys())
    if unknown:
        raise ValueError(
            f"config: {path} names no setting {', '.join(map(repr, unknown[:5]))} (`attnserve serve --help` lists them)"
        )
    values: dict[str, Any] = {}
    for name, raw in given.items():
        typ = _base(hints[name])
        if typ is Path and isinstance(raw, str):
            values[name] = path.parent / raw  # (an absolute one stays as it is)
        elif typ is float and isinstance(raw, int | float) and not isinstance(raw, bool):
            values[name] = float(raw)
        elif type(raw) is typ:  # (a bool is not taken for an int)
            values[name] = raw
        else:
            raise ValueError(f"config: {path}: {name} is {typ.__name__ if typ is not Path else 'a path'}, not {raw!r}")
    return values


API_KEYS_FILE_BYTES = 1024 * 1024  # a keys file holds a few keys: a larger one is not one


def api_keys_file_bytes(path: Path) -> bytes:
    """The bytes of the keys file at ``path``, up to API_KEYS_FILE_BYTES; ValueError says why not."""
    try:
        with path.open("rb") as f:
            data = f.read(API_KEYS_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"api_keys_file: cannot read {path}: {e.strerror}") from None
    if len(data) > API_KEYS_FILE_BYTES:
        raise ValueError(f"api_keys_file: {path} is over {API_KEYS_FILE_BYTES} bytes, not a file of keys")
    return data


CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# a key given as its SHA-256 ("sha256:" and 64 hex digits, as `printf %s KEY | sha256sum` prints
# them): the file, and the server, then hold no key a client could use
HASHED_KEY = "sha256:"


def priority_number(name: str) -> int:
    """A priority's name (PRIORITIES) as attnserve.v1's Priority numbers it: 1 the highest."""
    if name not in PRIORITIES:
        raise ValueError(name)
    return PRIORITIES.index(name) + 1


# What a line of the keys file may set for its client after the name and key ("alice key-a
# calls_per_second=50 tokens_per_second=20000"), each in place of the server's own setting for that
# client alone (0: no such limit for it), and how each is read
CLIENT_LIMITS: dict[str, typing.Callable[[str], float]] = {
    "max_calls": int,  # max_calls_per_client
    "calls_per_second": float,  # client_calls_per_second
    "burst": int,  # client_burst (one second of the client's own rate where that is given)
    "tokens_per_second": float,  # client_tokens_per_second
    "token_burst": int,  # client_token_burst (likewise)
    # the priority of the client's calls (high, normal, low) and the highest they get: a call that
    # asks none, or a higher one, is served at it
    "priority": priority_number,
}


def read_api_keys(path: Path, data: bytes | None = None) -> dict[str, str]:
    """The keys in the file at ``path`` (or in ``data``, its bytes read already), each to the name of
    its client (``read_keys_file``)."""
    return read_keys_file(path, data)[0]


def read_keys_file(path: Path, data: bytes | None = None) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """The keys in the file at ``path`` (or in ``data``, its bytes read already), each to the name of
    its client, and the limits of the clients whose lines set their own (CLIENT_LIMITS): a line holds
    a key, or a name and a key, then that client's limits as name=value where it has any; blank lines
    and lines starting with # are skipped. A name may stand before several keys (one client's old and
    new), its limits on any of them; a key only once. ValueError says why where there is none to
    take; no message repeats a key, or any word of a line that is not a limit's name."""
    if data is None:
        data = api_keys_file_bytes(path)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"api_keys_file: {path} is not UTF-8 text") from None
    keys: dict[str, str] = {}
    lines_of: dict[str, int] = {}
    limits: dict[str, dict[str, float]] = {}
    set_on: dict[tuple[str, str], int] = {}  # (client, limit): the line that set it
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2 and not all("=" in w for w in words[2:]):
            raise ValueError(
                f"api_keys_file: line {number} is not a key, or a client's name and a key (and its limits, "
                f"as {'=, '.join(CLIENT_LIMITS)}=)"
            )
        if len(words) == 2 and words[1].partition("=")[0] in CLIENT_LIMITS:  # a key, then a limit: no name
            raise ValueError(f"api_keys_file: line {number}: limits are a named client's: put its name before the key")
        name, key = words[:2] if len(words) >= 2 else ("", words[0])
        if name and not CLIENT_NAME.fullmatch(name):
            raise ValueError(f"api_keys_file: line {number}: a client's name is 1-64 of A-Z a-z 0-9 . _ -")
        if not all("!" <= c <= "~" for c in key):  # a header's value: printable ASCII, no spaces
            raise ValueError(f"api_keys_file: line {number} is not a key (printable ASCII, no spaces)")
        if key.startswith(HASHED_KEY):
            if not re.fullmatch(r"[0-9a-fA-F]{64}", key.removeprefix(HASHED_KEY)):
                raise ValueError(
                    f"api_keys_file: line {number}: a key given as its SHA-256 is sha256: and 64 hex digits"
                )
            key = key.lower()
        if key in keys:
            raise ValueError(f"api_keys_file: line {number} repeats the key of line {lines_of[key]}")
        keys[key], lines_of[key] = name, number
        for word in words[2:]:
            limit, _, raw = word.partition("=")
            if limit not in CLIENT_LIMITS:
                raise ValueError(f"api_keys_file: line {number}: a client's limits are {', '.join(CLIENT_LIMITS)}")
            kind = CLIENT_LIMITS[limit]
            try:
                value = kind(raw)
            except ValueError:
                value = -1
            if not 0 <= value < math.inf:
                if kind is priority_number:
                    raise ValueError(f"api_keys_file: line {number}: {limit} is {', '.join(PRIORITIES)}")
                whole = "a whole number" if kind is int else "a number"
                raise ValueError(f"api_keys_file: line {number}: {limit} is {whole} >= 0")
            if (name, limit) in set_on and limits[name][limit] != value:
                raise ValueError(f"api_keys_file: line {number}: {name}'s {limit} is not line {set_on[name, limit]}'s")
            limits.setdefault(name, {})[limit] = value
            set_on[name, limit] = number
    if not keys:
        raise ValueError(f"api_keys_file: {path} holds no key")
    for key, number in lines_of.items():
        twin = HASHED_KEY + hashlib.sha256(key.encode()).hexdigest()
        if twin in lines_of:
            raise ValueError(
                f"api_keys_file: lines {number} and {lines_of[twin]} hold one key, as itself and as its SHA-256"
            )
    for name, own in limits.items():
        for rate, burst in (("calls_per_second", "burst"), ("tokens_per_second", "token_burst")):
            if own.get(burst) and not own.get(rate):
                raise ValueError(f"api_keys_file: {name}'s {burst} needs its {rate}: it is that rate's bucket")
    return keys, limits


def _base(typ: Any) -> Any:
    """The type of a setting: X of ``X | None``."""
    return next(t for t in typ.__args__ if t is not type(None)) if isinstance(typ, types.UnionType) else typ


def _convert(raw: Any, typ: Any, name: str) -> Any:
    if not isinstance(raw, str):
        return raw
    typ = _base(typ)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return typ(raw)
    except ValueError as e:
        raise ValueError(f"{name}: cannot read {raw!r} as {getattr(typ, '__name__', typ)}") from e
