"""Docker Engine's GraphDriver plugin protocol (moby `daemon/graphdriver/proxy.go`),
served beside VolumeDriver on the same socket over strata's layer store
(`graph_store.GraphStore`): with `--experimental --storage-driver strata`, every
image layer and container root of dockerd ≤ 27 is a strata-unionfs mount.

What dockerd 20.10.24 (Debian) was seen to send (`strata serve --debug` under the tests of
tests/graphdriver/test_docker.py; POST, no Content-Type, the plugin Accept header, JSON
bodies with empty fields left out, ids random 64-hex "cache ids", never image digests):

- start-up: `/Plugin.Activate` (empty body) → `Init {"Home": "<data-root>/<plugin name>",
  "Opts": null, "UIDMaps": null, "GIDMaps": null}` → `Capabilities {}`; `Status {}` for each
  `docker info`; `Cleanup {}` at shutdown, after the last Put.
- `docker import` / `load` / `pull`, per layer bottom up: `Create {ID[, Parent]}`, then
  `/GraphDriver.ApplyDiff?id=ID&parent=PARENT` with the uncompressed tar as the body (length
  unknown to dockerd: chunked), answered `{"Size": n}`; dockerd digests the bytes it sent
  for the DiffID itself. `Exists` was never called in these flows.
- a container: `CreateReadWrite {ID: "<m>-init", Parent: <image top>}`, `Get` + `Put` of it
  (dockerd writes /etc/hosts, /.dockerenv, /dev/console... after stat-ing the merged view,
  so the init layer must be a real union), `CreateReadWrite {ID: m, Parent: "<m>-init"}`;
  `Get {ID: m}` → `{"Dir": path}` at each start, `Put` at each stop; `GetMetadata` for
  `inspect` and `exec`; `Remove` of m then of its init layer at `rm`.
- `docker diff`: `Changes {ID: m, Parent: "<m>-init"}` → `{"Changes": [{"Path", "Kind"}]}`
  (0 modify, 1 add, 2 delete); `commit`: `Get m`, `Diff {ID: m, Parent: "<m>-init"}` answered
  with the raw tar as the body, `Create` + `ApplyDiff` of the new layer, `Put m`.
- `docker save` / `push`: `Get` + `Put` per layer. Capabilities says ReproducesExactDiffs
  false (produce_layer writes a canonical tar, not the one received), so dockerd keeps the
  tar-split of every layer it applied and rebuilds the exact tar from it, reading the file
  contents through the mount: image ids and DiffIDs survive save/load and push/pull.
- `docker rmi`: `Remove` per layer, top first.

Errors are `{"Err": "..."}`, with HTTP 200 for JSON calls (dockerd reads `Err` from the body)
and 500 for Diff, whose 200 body would be taken for the tar. Ids are checked by the store
(64 hex, or `<id>-init`) before anything is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from common.errors import StrataError
from images.changes import ADDED, CHANGED, DELETED

from . import protocol as p
from .graph_store import GraphStore

log = logging.getLogger("strata.plugin")

IMPLEMENTS = "GraphDriver"
PREFIX = "/GraphDriver."
INIT, CREATE, CREATE_RW, REMOVE = (PREFIX + n for n in ("Init", "Create", "CreateReadWrite", "Remove"))
GET, PUT, EXISTS, STATUS = (PREFIX + n for n in ("Get", "Put", "Exists", "Status"))
METADATA, CLEANUP = PREFIX + "GetMetadata", PREFIX + "Cleanup"
CHANGES, DIFF_SIZE = PREFIX + "Changes", PREFIX + "DiffSize"
CAPABILITIES, DIFF, APPLY_DIFF = (PREFIX + n for n in ("Capabilities", "Diff", "ApplyDiff"))
# archive.ChangeType: ChangeModify 0, ChangeAdd 1, ChangeDelete 2.
CHANGE_KIND = {CHANGED: 0, ADDED: 1, DELETED: 2}
_CHUNK = 1 << 20

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _string(body: dict[str, Any], key: str) -> str:
    """An optional string field (dockerd leaves empty ones out)."""
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise p.ProtocolError(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


def _no_options(body: dict[str, Any], key: str, what: str) -> None:
    value = body.get(key)
    if value in (None, {}, []):
        return
    if not isinstance(value, dict | list):
        raise p.ProtocolError(f"field {key!r} must be an object or a list, not {type(value).__name__}")
    shown = ", ".join(sorted(map(str, value)))[:200]
    raise StrataError(f"{what} not supported by strata: {shown}")


class GraphDriverPlugin:
    """The GraphDriver endpoints over one layer store. `routes` are the JSON calls;
    Diff (a tar out) and ApplyDiff (a tar in) stream and have their own handlers."""

    def __init__(self, store: GraphStore) -> None:
        self.store = store
        self._opening = asyncio.Lock()
        handlers: dict[str, Handler] = {
            INIT: self.init, CREATE: self.create, CREATE_RW: self.create, REMOVE: self.remove,
            GET: self.get, PUT: self.put, EXISTS: self.exists, STATUS: self.status,
            METADATA: self.metadata, CLEANUP: self.cleanup, CHANGES: self.changes,
            DIFF_SIZE: self.diff_size, CAPABILITIES: self.capabilities,
        }
        self.routes = {endpoint: self._on_open_store(h) for endpoint, h in handlers.items()}

    async def open_store(self) -> None:
        """Open (and recover) the store if it is not yet: at start-up, and again at each call
        while another `strata serve` on the same state root holds it (an Err until then)."""
        if self.store.is_open:
            return
        async with self._opening:
            for line in await asyncio.to_thread(self.store.open):
                log.warning("layer store recovery: %s", line)

    def _on_open_store(self, handler: Handler) -> Handler:
        async def call(body: dict[str, Any]) -> dict[str, Any]:
            await self.open_store()
            return await handler(body)

        return call

    async def init(self, body: dict[str, Any]) -> dict[str, Any]:
        home = _string(body, "Home")
        _no_options(body, "Opts", "storage options (--storage-opt)")
        for key in ("UIDMaps", "GIDMaps"):
            _no_options(body, key, "user namespace remapping (--userns-remap)")
        log.info("GraphDriver.Init from dockerd (Home %s); layers live in %s", home or "-", self.store.root)
        return {}

    async def capabilities(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Capabilities": {"ReproducesExactDiffs": False}}

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        _no_options(body, "StorageOpt", "per-layer storage options (--storage-opt)")
        _string(body, "MountLabel")  # SELinux labels: not applied (no SELinux here)
        await asyncio.to_thread(self.store.create, _string(body, "ID"), _string(body, "Parent"))
        return {}

    async def remove(self, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.to_thread(self.store.remove, _string(body, "ID"))
        return {}

    async def get(self, body: dict[str, Any]) -> dict[str, Any]:
        _string(body, "MountLabel")
        path = await asyncio.to_thread(self.store.get, _string(body, "ID"))
        return {"Dir": str(path)}

    async def put(self, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.to_thread(self.store.put, _string(body, "ID"))
        return {}

    async def exists(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Exists": self.store.exists(_string(body, "ID"))}

    async def status(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Status": [list(kv) for kv in self.store.status()]}

    async def metadata(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Metadata": self.store.metadata(_string(body, "ID"))}

    async def cleanup(self, body: dict[str, Any]) -> dict[str, Any]:
        """dockerd shuts down: it has Put every layer it used; mounts of a live-restored
        container stay, with their references."""
        return {}

    async def changes(self, body: dict[str, Any]) -> dict[str, Any]:
        found = await asyncio.to_thread(self.store.changes, _string(body, "ID"), _string(body, "Parent"))
        return {"Changes": [{"Path": path, "Kind": CHANGE_KIND[kind]} for kind, path in found]}

    async def diff_size(self, body: dict[str, Any]) -> dict[str, Any]:
        size = await asyncio.to_thread(self.store.diff_size, _string(body, "ID"), _string(body, "Parent"))
        return {"Size": size}

    async def handle_diff(self, request: web.Request) -> web.StreamResponse:
        """The tar is written to an anonymous file in the store first, so a failure is a
        clean Err (status 500) rather than a tar cut short after its 200."""
        try:
            await self.open_store()
            body = p.decode_body(await request.read())
            layer, parent = _string(body, "ID"), _string(body, "Parent")
            tar = self.store.tmp_file()
        except StrataError as e:
            return _error(DIFF, e, status=500)
        with tar:
            try:
                await asyncio.to_thread(self.store.diff, layer, parent, tar)
            except Exception as e:  # every failure is an Err, never a cut tar
                return _error(DIFF, e, status=500)
            size = tar.tell()
            tar.seek(0)
            resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
            resp.content_length = size
            await resp.prepare(request)
            while chunk := await asyncio.to_thread(tar.read, _CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
        log.debug("%s %s -> %d bytes of tar", DIFF, body, size)
        return resp

    async def handle_apply_diff(self, request: web.Request) -> web.Response:
        """`POST /GraphDriver.ApplyDiff?id=ID&parent=PARENT`, the tar as the body, read as the
        extraction asks for it (never held whole in memory)."""
        layer, parent = request.query.get("id", ""), request.query.get("parent", "")
        source = io.BufferedReader(_BodyReader(request, asyncio.get_running_loop()), _CHUNK)
        try:
            await self.open_store()
            size = await asyncio.to_thread(self.store.apply_diff, layer, parent, source)
        except Exception as e:  # a bug too answers dockerd with a reason
            # Read the rest, so dockerd, still sending, gets the Err instead of a broken pipe.
            with contextlib.suppress(Exception):
                while await request.content.read(_CHUNK):
                    pass
            return _error(APPLY_DIFF, e)
        framing = request.headers.get("Transfer-Encoding") or f"Content-Length {request.content_length}"
        log.debug("%s id=%s parent=%s (%s) -> %d bytes", APPLY_DIFF, layer, parent, framing, size)
        return _json({"Size": size})

    def add_stream_routes(self, app: web.Application) -> None:
        """The two streaming calls; the JSON ones (`routes`) go through the server's handler."""
        app.router.add_post(DIFF, self.handle_diff)
        app.router.add_post(APPLY_DIFF, self.handle_apply_diff)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=p.encode(body), content_type=p.CONTENT_TYPE)


def _error(endpoint: str, e: Exception, status: int = 200) -> web.Response:
    if isinstance(e, StrataError):
        log.info("%s: %s", endpoint, e)
        return _json(p.error(str(e)), status)
    log.error("%s failed", endpoint, exc_info=e)
    return _json(p.error(f"internal error in strata: {type(e).__name__}: {e}"), status)


class _BodyReader(io.RawIOBase):
    """The request body as a blocking file for the extraction thread: each read waits for
    the event loop to hand over the next bytes of the stream."""

    def __init__(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._content = request.content
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        data = asyncio.run_coroutine_threadsafe(self._content.read(len(buf)), self._loop).result()
        buf[: len(data)] = data
        return len(data)
