"""``attnserve serve --model-dir DIR``: the gRPC server and its lifecycle.

Start: metrics port, gRPC port with the standard health service (NOT_SERVING) and server
reflection (v1 and v1alpha), then the model is loaded and warmed up off the event loop, and
only then does health say SERVING. A model directory that cannot be loaded ends start-up
with an error naming the file; health never says SERVING.

Stop (SIGTERM or SIGINT), in the order load balancers need:
1. health turns NOT_SERVING; calls are still served for ``drain_delay_seconds``, while the
   balancers notice and stop sending;
2. then new calls are refused with UNAVAILABLE (clients retry them elsewhere), and the calls
   in progress get ``grace_seconds`` to finish;
3. once none is left and none has arrived for a moment, the transport closes, the batchers
   and the generation loop end, and the process exits 0.
Every call the server took is answered or refused with UNAVAILABLE; none is cut off unless the
grace period runs out. A second signal ends the process at once (exit 1).

SIGHUP reads the API keys file again at once (it is also looked at every
``api_keys_reload_seconds``), and looks at the model directory (also every
``model_reload_seconds`` where set): a directory changed since it was loaded is loaded and warmed
up beside the model serving, off the event loop; then the calls that begin are served by it, those
in progress end on the model they began on, which is stopped after its last. A directory that
cannot be loaded leaves the model before serving, said in the log and by
``attnserve_model_dir_rejected``. The process goes on.

Settings: ``service.config.ServerConfig``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from service import logs
from service.config import ServerConfig, api_keys_file_bytes, read_keys_file
from service.engine import Engine
from service.errors import METHOD_NOT_SERVED, SERVICE_NOT_FOUND, bounded, details
from service.guard import CallGuard
from service.kserve import SERVICE_NAME as INFERENCE_NAME
from service.kserve import InferenceServicer
from service.metrics import Metrics
from service.model_dir import DirState
from service.model_dir import state as model_dir_state
from service.runtime import CUDA, Runtime
from service.scheduler import Scheduler
from service.servicer import AttnServeServicer, Loaded, WriteWatch, package_version
from service.tls import Certificates, Expiry
from service.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttnServe"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME, INFERENCE_NAME)  # the names health answers for


# The most often a client's own keepalive pings are accepted: gRPC's clients ping at most every 10 s
# (grpc-java and grpc-go raise anything lower to it); a server's default, 5 minutes, closes the
# connection of a client that pings more often than that with "too_many_pings".
CLIENT_PING_SECONDS = 10
NEVER_MS = 2**31 - 1  # what gRPC reads as "not at all" for its millisecond settings
# A model directory seen changed by a periodic look is loaded only if it is the same this long after:
# files still being copied into it are not taken half written
SETTLE_SECONDS = 1.0
# A model whose generation loop died is loaded anew at once, but not again within this long of the
# last time: a fault that comes back as soon as it is loaded is left NOT_SERVING, for SIGHUP or the
# pod's liveness probe to deal with, rather than loaded over and over.
REVIVE_SECONDS = 60.0


def connection_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's channel arguments for the server's connections: keepalive pings, the client pings it
    accepts, the connections' age and how long a handshake may take (see ServerConfig)."""

    def ms(seconds: float) -> int:
        return min(NEVER_MS, round(seconds * 1000))

    def ms_or_never(seconds: float) -> int:  # 0: not at all
        return ms(seconds) if seconds > 0 else NEVER_MS

    return [
        ("grpc.keepalive_time_ms", ms_or_never(cfg.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", ms(cfg.keepalive_timeout_seconds)),
        # what gRPC's transport waits for a ping's answer since it sends keepalives as plain pings: 1 minute
        # unless told (a client gone quiet was found out after keepalive_seconds plus a minute, not plus 10 s)
        ("grpc.http2.ping_timeout_ms", ms(cfg.keepalive_timeout_seconds)),
        # idle connections too, and with no limit on pings between data frames: a connection whose
        # client vanished while it was idle holds a descriptor until it is found out
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PING_SECONDS * 1000),
        ("grpc.max_connection_age_ms", ms_or_never(cfg.max_connection_age_seconds)),
        ("grpc.max_connection_idle_ms", ms_or_never(cfg.max_connection_idle_seconds)),
        ("grpc.server_handshake_timeout_ms", ms(cfg.handshake_timeout_seconds)),
        ("grpc.max_connection_age_grace_ms", ms(cfg.grace_seconds)),
    ]


class Health(health.aio.HealthServicer):
    """grpcio's health service, with a Check for a service it does not answer for refused NOT_FOUND
    as the server's own errors are: a message naming the services it does answer for, and an
    ErrorInfo (grpcio's says nothing, which leaves a probe given a wrong name guessing)."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._server_status:  # (grpcio's statuses by service name)
            code = grpc.StatusCode.NOT_FOUND
            named = sorted(name for name in self._server_status if name)
            listed = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)
            message = bounded(
                f"health: no service {request.service!r} here; it answers for '' (the server as a whole), {listed}"
            )
            await context.abort(code, message, details(code, message, SERVICE_NOT_FOUND))
        return await super().Check(request, context)


class NotServed(grpc.GenericRpcHandler):
    """The methods of a service that this server does not implement (Triton's model repository,
    shared memory, statistics and settings RPCs), answered UNIMPLEMENTED with a message that says
    what is served, rather than grpc's bare "Method not found"."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"

    def service(self, call: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = call.method  # type: ignore[attr-defined]
        if not method.startswith(self.prefix):
            return None
        name = method[len(self.prefix) :]

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            code = grpc.StatusCode.UNIMPLEMENTED
            message = (
                f"{bounded(name)} is not served by attnserve; the Open Inference Protocol methods served are "
                "ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer and ModelStreamInfer"
            )
            await context.abort(code, message, details(code, message, METHOD_NOT_SERVED))
            return b""

        return grpc.unary_unary_rpc_method_handler(refuse)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
QUIET_SECONDS = 0.1  # no call arriving for this long, none in progress: the transport may close


def _reflection_v1_descriptor() -> None:
    """Put grpc.reflection.v1 in the descriptor pool: the v1alpha file renamed, its messages the same
    field for field (v1 is v1alpha made stable), so that reflection can describe itself under v1 too."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    fd = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(fd)
    fd.name = "grpc/reflection/v1/reflection.proto"
    fd.package = "grpc.reflection.v1"
    for message in fd.message_type:
        for f in message.field:
            if f.type_name.startswith(".grpc.reflection.v1alpha."):
                f.type_name = f.type_name.replace(".v1alpha.", ".v1.")
    for method in fd.service[0].method:
        method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
        method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    fd.options.Clear()
    pool.Add(fd)


def add_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Server reflection under both names current tools ask for: grpc.reflection.v1 (grpcurl, Postman)
    and v1alpha (older clients). One servicer answers both; the two protocols' messages are identical."""
    _reflection_v1_descriptor()
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


class Server:
    """The gRPC server, its health and metrics, and the model behind them."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.servicer = AttnServeServicer(self.metrics, config.request_limits())
        self.servicer.max_concurrent_calls = config.max_concurrent_calls
        self.inference = InferenceServicer(self.servicer, lambda: self.serving)
        self.serving = False  # the model is loaded and the server takes calls
        admitted = (SERVICE_NAME, f"/{INFERENCE_NAME}/ModelInfer", f"/{INFERENCE_NAME}/ModelStreamInfer")
        self.guard = CallGuard(
            self.metrics,
            admitted,
            config.max_concurrent_calls,
            config.max_probe_streams,
            config.request_read_timeout_seconds,
            config.api_keys,
            config.max_calls_per_client,
            config.client_calls_per_second,
            config.client_burst,
            config.client_tokens_per_second,
            config.client_token_burst,
            config.client_limits,
        )
        self.servicer.access_log = self.guard.access_log = config.access_log
        self.servicer.access_log_errors_only = config.access_log_errors_only
        self.servicer.limits_of = self.guard.limits_of
        if config.stream_write_timeout_seconds > 0:
            self.servicer.write_watch = WriteWatch(config.stream_write_timeout_seconds)
        self._write_sweep: asyncio.Task[None] | None = None
        self.api_keys = config.api_keys
        self.client_limits = config.client_limits
        self._keys_file: bytes | str | None = None  # the keys file's bytes as last read, or why they could not be
        self._keys_watch: asyncio.Task[None] | None = None
        # the model directory as loaded, and as it was when it could not be (or why it could not be read)
        self._model_state: DirState | None = None
        self._model_refused: DirState | str | None = None
        self._model_lock = asyncio.Lock()
        self._model_watch: asyncio.Task[None] | None = None
        # models replaced, until their last call ends, and a model being loaded anew for its dead loop
        self._retiring: set[asyncio.Task[None]] = set()
        self._revived_at = -math.inf  # when a model was last loaded anew because its generation loop died
        self._stopping = False
        self.health = Health()
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._health_server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._server: grpc.aio.Server | None = None
        self.tracing: Tracing | None = None

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    @property
    def scheduler(self) -> Scheduler | None:
        return self.servicer.scheduler

    async def start(self) -> None:
        cfg = self.config
        if cfg.otlp_endpoint:
            resource = {"service.version": package_version(), "attnserve.model_dir": str(cfg.model_dir)}
            self.tracing = Tracing(cfg.otlp_endpoint, cfg.trace_sample_ratio, resource)
            self.tracing.start()
        self.metrics.device_requested.labels(cfg.device).set(1)
        self.metrics.init_series()
        if cfg.metrics_port >= 0:
            self._metrics_server = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            self.metrics_port = self._metrics_server.server_port
        options = [
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            # a request's texts are bounded by max_request_bytes: a larger message is refused before it is parsed
            ("grpc.max_receive_message_length", cfg.max_request_bytes + 64 * 1024),
            *connection_options(cfg),
        ]
        server = grpc.aio.server(options=options, interceptors=[self.guard])
        self._server = server
        pb_grpc.add_AttnServeServicer_to_server(self.servicer, server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference, server)
        server.add_generic_rpc_handlers((NotServed(INFERENCE_NAME),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        add_reflection(server, (SERVICE_NAME, INFERENCE_NAME, HEALTH_NAME))
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        certificates = None
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            certificates = Certificates(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, self.metrics.tls_rejected.set)
            self.port = server.add_secure_port(address, certificates.credentials())
        else:
            self.port = server.add_insecure_port(address)
        self.metrics.registry.register(Expiry(certificates))
        await server.start()
        if cfg.health_port >= 0:
            # the same health servicer, so both ports say the same; the same guard, so Watch
            # streams on both count against one bound
            self._health_server = grpc.aio.server(options=connection_options(cfg), interceptors=[self.guard])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            await self._health_server.start()
            log.info("health alone, in plaintext, on %s:%d (for probes that speak no TLS)", cfg.host, self.health_port)
        if (watch := self.servicer.write_watch) is not None:

            async def sweep() -> None:
                watch.sweep()

            self._write_sweep = self._watch(watch.every, sweep, "the streams' writes")
        keys = self.api_keys
        self.metrics.api_keys.set(len(keys or ()))
        if cfg.api_keys_file is not None and cfg.api_keys_reload_seconds > 0:
            self._keys_watch = self._watch(cfg.api_keys_reload_seconds, self.reload_api_keys, "the API keys file")
        log.info(
            "gRPC on %s:%d%s%s, metrics on :%s; loading %s",
            cfg.host,
            self.port,
            (" (mutual TLS)" if cfg.tls_client_ca else " (TLS)") if cfg.tls_cert else "",
            f", calls to the model need one of {len(keys)} API key(s)" if keys else "",
            self.metrics_port if cfg.metrics_port >= 0 else "off",
            cfg.model_dir,
        )
        if keys and not cfg.tls_cert:
            log.warning(
                "API keys without TLS travel in the clear: give --tls-cert and --tls-key, "
                "unless TLS ends in front of this server (a mesh's sidecar, an ingress)"
            )

        # Load and warm up off the event loop: health answers NOT_SERVING meanwhile.
        try:  # (from where the directory resolves now: a link swapped meanwhile is the next load's)
            self._model_state = await asyncio.to_thread(model_dir_state, cfg.model_dir)
            path = Path(self._model_state[0])
        except OSError:  # the runtime says what is missing
            path = cfg.model_dir
        runtime = await asyncio.get_running_loop().run_in_executor(None, Runtime, path, cfg.runtime_options())
        self._serve(runtime)
        self.metrics.ready.set(1)
        self.serving = True
        for name in HEALTH_SERVICES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s %s on %s", runtime.info.name, runtime.info.version, runtime.provider)
        if cfg.model_reload_seconds > 0:
            self._model_watch = self._watch(cfg.model_reload_seconds, self.reload_model, "the model directory")

    def _serve(self, runtime: Runtime) -> None:
        """Start an engine and a generation scheduler on ``runtime``, for the calls that begin from
        now (those in progress go on with the model they began on, which the caller retires)."""
        cfg = self.config
        limits = cfg.batch_limits(runtime.provider == CUDA, runtime.cpu_threads)
        engine = Engine(runtime, limits, self.metrics, cfg.batch_nice)
        engine.start()
        scheduler = Scheduler(runtime, cfg.generation_limits(), self.metrics)
        before = self.servicer.attach(engine, scheduler)
        scheduler.on_death = functools.partial(self._generation_died, self.servicer.loaded)
        scheduler.start()
        if before is not None:
            self.metrics.provider.labels(before.engine.runtime.provider).set(0)
        self.metrics.provider.labels(runtime.provider).set(1)
        self.metrics.model.info({"name": runtime.info.name, "version": runtime.info.version})

    async def reload_model(self, asked: bool = False) -> None:
        """Look at the model directory and, where it changed since its model was loaded, load it and
        serve the calls that begin from then with it; the model before serves its calls in progress
        and is stopped after the last. A directory that cannot be loaded leaves the model before
        serving, said in the log once a change (and in ``attnserve_model_dir_rejected``). A look
        of its own (not ``asked``, by SIGHUP) loads only a directory that stays the same for
        SETTLE_SECONDS, so that one being copied is not taken half written; asked, the outcome is
        logged, changed or not."""
        if self.servicer.loaded is None or self._stopping:
            return
        async with self._model_lock:
            loaded = self.servicer.loaded
            now = await self._look_at_model_dir()
            # a model whose generation loop died is loaded anew from its directory, changed or not;
            # on a look of its own, not again within REVIVE_SECONDS of the last time
            revive = loaded.scheduler.dead and (asked or time.monotonic() - self._revived_at >= REVIVE_SECONDS)
            if now == self._model_state and not revive:
                if asked:
                    log.info("model directory unchanged: serving %s", loaded)
                return
            if now == self._model_refused and not asked:
                return
            if not asked and now != self._model_state:  # (one replaced by a rename is missing for a moment, too)
                await asyncio.sleep(SETTLE_SECONDS)
                if await self._look_at_model_dir() != now:
                    return  # still changing: the next look
            if isinstance(now, str):
                self._model_rejected(now, now, loaded)
                return
            if now == self._model_state:
                log.info("generation of %s is down: loading it anew from %s", loaded, now[0])
            else:
                log.info("model directory %s changed: loading it beside %s", now[0], loaded)
            try:
                options = self.config.runtime_options()
                runtime = await asyncio.get_running_loop().run_in_executor(None, Runtime, Path(now[0]), options)
            except Exception as e:  # whatever it was, the model before goes on
                self._model_rejected(now, str(e), loaded)
                return
            if self._stopping:
                return
            self._serve(runtime)
            self._model_state, self._model_refused = now, None
            self.metrics.model_rejected.set(0)
            self.metrics.model_reloads.labels("loaded").inc()
            if loaded.scheduler.dead:
                self._revived_at = time.monotonic()
            if not self.serving:  # (generation was down: stopping, it would have returned above)
                self.metrics.ready.set(1)
                self.serving = True
                for name in HEALTH_SERVICES:
                    await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
                log.warning("generation is back: serving %s; SERVING again", self.servicer.loaded)
            log.info(
                "serving %s from %s on %s; %s serves its %d call(s) in progress, then stops",
                self.servicer.loaded,
                now[0],
                runtime.provider,
                loaded,
                loaded.users,
            )
            task = asyncio.get_running_loop().create_task(self._retire(loaded))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            task.add_done_callback(_let_go)

    async def _look_at_model_dir(self) -> DirState | str:
        """The model directory's state now, or why it cannot be read."""
        try:
            return await asyncio.to_thread(model_dir_state, self.config.model_dir)
        except OSError as e:
            return f"{self.config.model_dir}: cannot be read ({e.strerror or e})"

    def _model_rejected(self, seen: DirState | str, why: str, serving: Loaded) -> None:
        self._model_refused = seen
        self.metrics.model_rejected.set(1)
        self.metrics.model_reloads.labels("rejected").inc()
        log.error("model directory not loaded: %s; still serving %s", why, serving)

    @staticmethod
    async def _retire(before: Loaded) -> None:
        """Stop a replaced model's engine and scheduler once its last call has ended."""
        await before.idle.wait()
        await asyncio.gather(before.engine.stop(), before.scheduler.stop())
        log.info("%s stopped: its last call has ended", before)

    async def reload_api_keys(self, asked: bool = False) -> None:
        """Read the API keys file again and, where its keys changed, take them in place of those
        before. A file that cannot be read or holds no key leaves the keys before in place, said in
        the log once a change (and in ``attnserve_api_keys_file_rejected``). ``asked`` (SIGHUP):
        the outcome is logged, changed or not."""
        path = self.config.api_keys_file
        if path is None or self.api_keys is None:
            if asked:
                log.info("no API keys file to read again: this server needs no key (--api-keys-file)")
            return
        try:
            data: bytes | str = await asyncio.to_thread(api_keys_file_bytes, path)
        except ValueError as e:
            data = str(e)
        if data == self._keys_file and not asked:
            return
        self._keys_file = data
        before, limits_before = self.api_keys, self.client_limits
        try:
            if isinstance(data, str):
                raise ValueError(data)
            keys, limits = read_keys_file(path, data)
        except ValueError as e:
            self.metrics.api_keys_rejected.set(1)
            log.error("%s; the %d API key(s) read before are still accepted, with their limits", e, len(before))
            return
        self.metrics.api_keys_rejected.set(0)
        if keys == before and limits == limits_before:
            if asked:
                log.info("API keys read again from %s: unchanged, %d key(s)", path, len(keys))
            return
        self.api_keys, self.client_limits = keys, limits
        self.guard.accept_keys(keys, limits)
        self.metrics.api_keys.set(len(keys))
        changed = {name for name in limits.keys() | limits_before.keys() if limits.get(name) != limits_before.get(name)}
        log.info(
            "API keys read again from %s: %d key(s) now, %d added, %d retired; limits of their own for %d "
            "client(s), changed for %s",
            path,
            len(keys),
            len(keys.keys() - before.keys()),
            len(before.keys() - keys.keys()),
            len(limits),
            ", ".join(sorted(changed)) or "none",
        )

    @staticmethod
    def _watch(every: float, look: Callable[[], Awaitable[None]], what: str) -> asyncio.Task[None]:
        """Call ``look`` every ``every`` seconds, to act on what changed in ``what`` or is overdue."""

        async def watch() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await look()
                except Exception:  # a fault of the server's own: what was read before stays, and the watch goes on
                    log.exception("looking at %s failed; looking again in %gs", what, every)

        return asyncio.get_running_loop().create_task(watch())

    def _generation_died(self, loaded: Loaded | None) -> None:
        """The generation loop of ``loaded`` ended by itself. The model serving can no longer serve
        all of its API: NOT_SERVING, and it is loaded anew, unless it was loaded anew for this less
        than REVIVE_SECONDS ago. A model replaced had only its streams in progress to end."""
        self.metrics.generation_deaths.inc()
        if loaded is not self.servicer.loaded:
            log.error("the generation loop of %s, replaced, died: its generations in progress were ended", loaded)
            return
        log.critical("generation is down: reporting NOT_SERVING so that traffic goes to other replicas")
        self.metrics.ready.set(0)
        self.serving = False
        revive = not self._stopping and time.monotonic() - self._revived_at >= REVIVE_SECONDS
        if not revive and not self._stopping:
            log.critical(
                "generation died again within %.0fs of its model being loaded anew: left NOT_SERVING "
                "(SIGHUP loads it anew)",
                REVIVE_SECONDS,
            )

        async def down() -> None:
            for name in HEALTH_SERVICES:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if revive:
                await self.reload_model()

        task = asyncio.get_running_loop().create_task(down())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        delay = self.config.drain_delay_seconds if drain_delay is None else drain_delay
        self._stopping = True
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and it stays so
        self.metrics.ready.set(0)
        self.serving = False
        if delay > 0 and self.engine is not None:
            log.info("shutting down: NOT_SERVING; still serving for %.1fs while load balancers notice", delay)
            await asyncio.sleep(delay)
        log.info("shutting down: refusing new calls; %d in progress get up to %.1fs", self.guard.in_flight, grace)
        self.guard.refuse("server is shutting down; retry on another replica")
        self.inference.closing.set()  # open v2 streams finish what they have and end
        end = time.monotonic() + grace
        if not await self.guard.drained(QUIET_SECONDS, grace):
            log.warning("grace period over with %d calls in progress: cancelling them", self.guard.in_flight)
        if self._server is not None:
            await self._server.stop(max(0.0, end - time.monotonic()))
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.engine is not None:
            await self.engine.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._retiring:  # models replaced: their calls have ended with the transport
            await asyncio.wait(self._retiring, timeout=grace)
        for watch in (self._keys_watch, self._model_watch, self._write_sweep):
            if watch is not None:
                watch.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.tracing is not None:  # the spans of the last calls made and sent, 10 s at most
            await asyncio.to_thread(self.tracing.stop)
        log.info("stopped")


def _let_go(_: object) -> None:
    """Free a stopped model now. Its objects hold one another (a batcher its engine's runner, ...),
    so they go only with the collector's next full pass, which a server may not make for many
    minutes, holding the model's sessions meanwhile: six models loaded under load took the server
    from 156 to 285 MiB, and with this it stayed within 155-178 MiB. ~20 ms of the event loop, once
    a model."""
    gc.collect()


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set():  # a second signal: the operator will not wait for the drain
            log.warning("%s again: exiting now, without draining", sig.name)
            logs.flush()
            logging.shutdown()
            os._exit(1)
        log.info("%s: stopping", sig.name)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:  # look at the keys file and the model directory now (its default action ends the process)
        log.info("SIGHUP: reading the API keys file and the model directory again")
        for reload in (server.reload_api_keys, server.reload_model):
            task = loop.create_task(reload(asked=True))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await server.start()
    except BaseException:
        await server.stop(0, 0)
        raise
    await stopping.wait()
    await server.stop()
