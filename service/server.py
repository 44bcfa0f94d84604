"""``attnserve serve --model-dir DIR``: the gRPC server and its lifecycle.

Start: metrics port, gRPC port with the standard health service (NOT_SERVING) and server
reflection, then the model is loaded and warmed up off the event loop, and only then does
health say SERVING. Stop (SIGTERM or SIGINT): health turns NOT_SERVING, new requests are
refused with UNAVAILABLE, requests in flight finish within the grace period, the batchers
drain, and the process exits 0.

Settings: ``service.config.ServerConfig``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.attnserve.v1 import attnserve_pb2 as pb
from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.engine import Engine
from service.metrics import Metrics
from service.runtime import Runtime
from service.scheduler import Scheduler
from service.servicer import AttnServeServicer, RequestLimits

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttnServe"].full_name


class Server:
    """The gRPC server, its health and metrics, and the model behind them."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.servicer = AttnServeServicer(self.metrics, RequestLimits(config.max_texts_per_request))
        self.health = health.aio.HealthServicer()
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        cfg = self.config
        self.metrics.device_requested.labels(cfg.device).set(1)
        self.metrics.init_series()
        if cfg.metrics_port >= 0:
            self._metrics_server = self.metrics.serve(cfg.metrics_port, cfg.metrics_host)
            self.metrics_port = self._metrics_server.server_port
        options = [
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ]
        server = grpc.aio.server(options=options)
        self._server = server
        pb_grpc.add_AttnServeServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        log.info(
            "gRPC on %s:%d%s, metrics on :%s; loading %s",
            cfg.host,
            self.port,
            " (TLS)" if cfg.tls_cert else "",
            self.metrics_port if cfg.metrics_port >= 0 else "off",
            cfg.model_dir,
        )

        # Load and warm up off the event loop: health answers NOT_SERVING meanwhile.
        runtime = await asyncio.get_running_loop().run_in_executor(None, Runtime, cfg.model_dir, cfg.runtime_options())
        self.engine = Engine(runtime, cfg.batch_limits(), self.metrics)
        self.engine.start()
        self.scheduler = Scheduler(runtime, cfg.generation_limits(), self.metrics)
        self.scheduler.start()
        self.servicer.attach(self.engine, self.scheduler)
        self.metrics.provider.labels(runtime.provider).set(1)
        self.metrics.model.info({"name": runtime.info.name, "version": runtime.info.version})
        self.metrics.ready.set(1)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s %s on %s", runtime.info.name, runtime.info.version, runtime.provider)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down: draining for up to %.1fs", grace)
        await self.health.enter_graceful_shutdown()
        self.metrics.ready.set(0)
        if self._server is not None:
            await self._server.stop(grace)  # refuses new calls; waits for those in flight
        self.servicer.accepting = False
        if self.engine is not None:
            await self.engine.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("stopped")


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    await stopping.wait()
    await server.stop()
