"""The VolumeDriver plugin service: aiohttp on a unix socket, answering Docker
Engine (or any client of the protocol) from any `protocol.VolumeDriver` (strata's
is the volume manager, handed in where `strata serve` builds the service).

Driver calls may block (file I/O, fsync, mount, strata-unionfs start-up), so they
run in worker threads; keeping concurrent calls consistent is the driver's part
(the volume manager's file locks also order them with `strata volume` commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from common.atomic import write_atomic
from common.errors import StrataError

from . import protocol as p
from .graph_store import GraphStore
from .graphdriver import IMPLEMENTS as GRAPH_IMPLEMENTS
from .graphdriver import GraphDriverPlugin
from .protocol import SOCKET_DIR, SPEC_DIR, VolumeDriver
from .sockets import claim_socket as _claim_socket
from .sockets import notify_systemd as _notify_systemd

log = logging.getLogger("strata.plugin")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class VolumePlugin:
    """The endpoints over one driver: each parses its typed request, calls the driver and
    shapes its typed answer."""

    def __init__(self, driver: VolumeDriver, graph: GraphDriverPlugin | None = None) -> None:
        self.driver = driver
        self.graph = graph  # GraphDriver on the same socket, when the service has a layer store
        self.routes: dict[str, Handler] = {
            p.ACTIVATE: self.activate, p.CREATE: self.create, p.REMOVE: self.remove,
            p.MOUNT: self.mount, p.UNMOUNT: self.unmount, p.PATH: self.path,
            p.GET: self.get, p.LIST: self.list, p.CAPABILITIES: self.capabilities,
            **(graph.routes if graph else {}),
        }

    async def activate(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.graph is not None:
            return {"Implements": [*p.IMPLEMENTS["Implements"], GRAPH_IMPLEMENTS]}
        return p.IMPLEMENTS

    async def capabilities(self, body: dict[str, Any]) -> dict[str, Any]:
        return p.capabilities(self.driver.scope)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        req = p.CreateRequest.parse(body)
        await asyncio.to_thread(self.driver.create, req.name, req.opts)
        return {}

    async def remove(self, body: dict[str, Any]) -> dict[str, Any]:
        req = p.NameRequest.parse(body)
        await asyncio.to_thread(self.driver.remove, req.name)
        return {}

    async def mount(self, body: dict[str, Any]) -> dict[str, Any]:
        req = p.MountRequest.parse(body)
        path = await asyncio.to_thread(self.driver.mount, req.name, req.id)
        return {"Mountpoint": str(path)}

    async def unmount(self, body: dict[str, Any]) -> dict[str, Any]:
        req = p.MountRequest.parse(body)
        await asyncio.to_thread(self.driver.unmount, req.name, req.id)
        return {}

    async def path(self, body: dict[str, Any]) -> dict[str, Any]:
        req = p.NameRequest.parse(body)
        return {"Mountpoint": str(await asyncio.to_thread(self.driver.path, req.name))}

    async def get(self, body: dict[str, Any]) -> dict[str, Any]:
        req = p.NameRequest.parse(body)
        vol = await asyncio.to_thread(self.driver.get, req.name)
        return {"Volume": p.volume_object(vol)}

    async def list(self, body: dict[str, Any]) -> dict[str, Any]:
        vols = await asyncio.to_thread(self.driver.list_volumes)
        return {"Volumes": [p.volume_object(v) for v in vols]}

    async def handle(self, request: web.Request) -> web.Response:
        endpoint = request.path
        try:
            raw = await _read_limited(request)
            body = p.decode_body(raw)
            out = await self.routes[endpoint](body)
            log.debug("%s %s -> %s", endpoint, body, out)
        except StrataError as e:
            log.info("%s: %s", endpoint, e)
            out = p.error(str(e))
        except Exception as e:  # a bug: answer Docker with a reason rather than a dropped connection
            log.exception("%s failed", endpoint)
            out = p.error(f"internal error in strata: {type(e).__name__}: {e}")
        return web.Response(body=p.encode(out), content_type=p.CONTENT_TYPE)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=p.MAX_BODY)
        for endpoint in self.routes:
            app.router.add_post(endpoint, self.handle)
        if self.graph is not None:
            self.graph.add_stream_routes(app)
        app.router.add_route("*", "/{tail:.*}", _unknown)
        return app


async def _unknown(request: web.Request) -> web.Response:
    body = p.error(f"unknown endpoint {request.method} {request.path}")
    return web.Response(status=404, body=p.encode(body), content_type=p.CONTENT_TYPE)


async def _read_limited(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > p.MAX_BODY:
        raise p.ProtocolError(f"request body too large ({request.content_length} bytes, limit {p.MAX_BODY})")
    buf = bytearray()
    while chunk := await request.content.read(p.MAX_BODY):
        buf += chunk
        if len(buf) > p.MAX_BODY:
            raise p.ProtocolError(f"request body too large (over {p.MAX_BODY} bytes)")
    return bytes(buf)


def spec_path_for(name: str, socket_path: Path, spec_dir: Path = SPEC_DIR) -> Path | None:
    """Docker finds NAME.sock in /run/docker/plugins by itself; anywhere else it needs a spec file."""
    return None if socket_path == SOCKET_DIR / f"{name}.sock" else spec_dir / f"{name}.spec"


class PluginService:
    """The running service: socket, optional spec file, and clean shutdown."""

    def __init__(
        self, driver: VolumeDriver, socket_path: Path, spec_path: Path | None = None,
        graph: GraphStore | None = None,
    ) -> None:
        self.driver = driver
        self.socket_path = socket_path
        self.spec_path = spec_path
        self.graph = graph
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        for line in await asyncio.to_thread(self.driver.recover):
            log.warning("recovery: %s", line)
        graph = GraphDriverPlugin(self.graph) if self.graph is not None else None
        if graph is not None:
            try:
                await graph.open_store()
            except StrataError as e:  # volumes are still served; GraphDriver calls get this Err
                log.warning("GraphDriver: %s", e)
        app = VolumePlugin(self.driver, graph).app()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        try:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            _claim_socket(self.socket_path)
            old = os.umask(0o177)  # the socket is born 0600: Docker runs as root, nobody else may mount
            try:
                await web.UnixSite(self._runner, str(self.socket_path)).start()
            finally:
                os.umask(old)
            if self.spec_path is not None:
                self.spec_path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.spec_path, f"unix://{self.socket_path}\n".encode())
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise StrataError(f"cannot serve on {self.socket_path}: {e.strerror or e}") from None
        log.info("serving %s on %s", " and ".join(["VolumeDriver", *(["GraphDriver"] if graph else [])]),
                 self.socket_path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.graph is not None:
            self.graph.close()
        for path in (self.spec_path, self.socket_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


async def serve_until_signalled(*services: PluginService) -> None:
    """Serve every service (e.g. the local and the shared volume plugins of `strata serve`)
    in this loop until SIGTERM or SIGINT, then shut each down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[PluginService] = []
    try:
        for svc in services:
            await svc.start()
            started.append(svc)
        _notify_systemd(b"READY=1")  # once every socket listens
        await stop.wait()
    finally:
        for svc in started:
            await svc.stop()
