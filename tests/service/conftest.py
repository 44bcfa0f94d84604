"""A real server on a loopback port, running its own event loop in a thread, for sync gRPC clients."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.attnserve.v1 import attnserve_pb2_grpc as pb_grpc
from service.config import ServerConfig
from service.server import Server


class ServerThread:
    def __init__(self, config: ServerConfig) -> None:
        self.server = Server(config)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()
        self.loop.run_forever()

    def start(self, wait: bool = True) -> ServerThread:
        self.thread.start()
        if wait:
            self._ready.wait(60)
            if self._error:
                raise self._error
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stub(self) -> pb_grpc.AttnServeStub:
        return pb_grpc.AttnServeStub(grpc.insecure_channel(self.address))


def fail_first_encode(st: ServerThread, message: str = "device lost its mind") -> None:
    """Make the server's next encode batch raise RuntimeError(message), as a fault of its own; those
    after it run."""
    engine = st.server.engine
    assert engine is not None
    real = engine.runtime.encode
    failed = False

    def flaky(ids: Any, mask: Any) -> Any:
        nonlocal failed
        if not failed:
            failed = True
            raise RuntimeError(message)
        return real(ids, mask)

    engine.runtime.encode = flaky  # type: ignore[method-assign]


def mount_secret(directory: Path, files: dict[str, bytes]) -> None:
    """``files`` in ``directory`` as the kubelet mounts a Secret's keys and updates them: each a link
    into ``..data``, itself a link to this version's directory, swapped to it in one rename."""
    version = directory / f"..{time.monotonic_ns()}"
    version.mkdir()
    for name, data in files.items():
        (version / name).write_bytes(data)
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def wait_for(condition: Callable[[], bool], seconds: float = 10) -> bool:
    """Whether ``condition`` came true within ``seconds`` (for what the server does once a call ends)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def outcome(call: grpc.Future) -> tuple[grpc.StatusCode, str]:
    """A finished call's status code and details."""
    try:
        call.result()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def config(model_dir: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(
        **{"drain_delay_seconds": 0.0, "device": "cpu", **kw},
        model_dir=model_dir,
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
    )


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[ServerThread]:
    st = ServerThread(config(model_dir)).start()
    yield st
    st.stop()
