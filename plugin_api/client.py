"""The client side of the Docker plugin protocol: find a plugin by name the way
Docker does (a socket in /run/docker/plugins, or a spec file naming its address)
and call it exactly as Docker Engine does (POST, Accept header, no Content-Type,
JSON + newline). Used by the tests, the benchmark and the runtime for any
VolumeDriver plugin, strata's or a third party's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from common.errors import StrataError
from common.parsing import load_json

from . import protocol as p

SOCKET_DIRS = (Path("/run/docker/plugins"),)
SPEC_DIRS = (Path("/etc/docker/plugins"), Path("/usr/lib/docker/plugins"))


class PluginError(StrataError):
    """The plugin answered with Err, or could not be reached."""


def discover(
    name: str, socket_dirs: Sequence[Path] = SOCKET_DIRS, spec_dirs: Sequence[Path] = SPEC_DIRS
) -> str:
    """The address (unix:///path or tcp://host:port) of plugin name, looked up in Docker's order:
    NAME.sock, then NAME.spec (a URL on one line), then NAME.json ({"Addr": URL})."""
    if "/" in name or not name:
        raise PluginError(f"invalid plugin name {name!r}")
    for d in socket_dirs:
        sock = d / f"{name}.sock"
        if sock.is_socket():
            return f"unix://{sock}"
    for d in spec_dirs:
        spec, js = d / f"{name}.spec", d / f"{name}.json"
        if spec.is_file():
            return _check_address(spec.read_text().strip(), spec)
        if js.is_file():
            try:
                addr = load_json(js.read_bytes(), str(js))["Addr"]
            except (StrataError, KeyError, TypeError) as e:
                raise PluginError(f"unreadable plugin spec {js}: {e}") from None
            return _check_address(str(addr), js)
    raise PluginError(f"plugin {name} not found (no {name}.sock, .spec or .json in the plugin directories)")


def _check_address(addr: str, where: Path | str) -> str:
    if addr.startswith("unix:///") or addr.startswith("tcp://"):
        return addr
    raise PluginError(f"plugin address {addr!r} in {where} is neither unix:///PATH nor tcp://HOST:PORT")


class PluginClient:
    """An async client for one plugin; use as `async with PluginClient(addr) as c:`."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        _check_address(address, "the address given")
        self.address = address
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_plugin(cls, name: str, timeout: float = 30.0) -> PluginClient:
        return cls(discover(name), timeout)

    async def __aenter__(self) -> PluginClient:
        if self.address.startswith("unix://"):
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=self.address[len("unix://"):])
            self._base = "http://plugin"
        else:
            connector = aiohttp.TCPConnector()
            self._base = "http://" + self.address[len("tcp://"):]
        self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call_raw(self, endpoint: str, data: bytes) -> tuple[int, bytes]:
        """POST raw bytes to endpoint as Docker does; (HTTP status, body). For protocol tests."""
        if self._session is None:
            raise PluginError("PluginClient used outside `async with`")
        try:
            async with self._session.post(
                self._base + endpoint, data=data, headers={"Accept": p.ACCEPT},
                skip_auto_headers=("Content-Type",),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise PluginError(f"plugin at {self.address} unreachable: {e}") from None

    async def call(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One protocol call; raises PluginError carrying the plugin's Err."""
        status, raw = await self.call_raw(endpoint, b"" if body is None else p.encode(body))
        try:
            out = load_json(raw, f"{endpoint}: HTTP {status}") if raw.strip() else {}
        except StrataError as e:
            raise PluginError(f"{e}: {raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise PluginError(f"{endpoint}: plugin answered {type(out).__name__}, not an object")
        if out.get("Err"):
            raise PluginError(f"{endpoint}: {out['Err']}")
        if status != 200:
            raise PluginError(f"{endpoint}: plugin answered HTTP {status}")
        return out

    async def activate(self) -> list[str]:
        return list((await self.call(p.ACTIVATE)).get("Implements") or [])

    async def capabilities(self) -> dict[str, Any]:
        return dict((await self.call(p.CAPABILITIES, {})).get("Capabilities") or {})

    async def create(self, name: str, opts: dict[str, str] | None = None) -> None:
        await self.call(p.CREATE, {"Name": name, "Opts": opts})

    async def remove(self, name: str) -> None:
        await self.call(p.REMOVE, {"Name": name})

    async def mount(self, name: str, mount_id: str) -> str:
        return str((await self.call(p.MOUNT, {"Name": name, "ID": mount_id}))["Mountpoint"])

    async def unmount(self, name: str, mount_id: str) -> None:
        await self.call(p.UNMOUNT, {"Name": name, "ID": mount_id})

    async def path(self, name: str) -> str:
        return str((await self.call(p.PATH, {"Name": name})).get("Mountpoint", ""))

    async def get(self, name: str) -> dict[str, Any]:
        return dict((await self.call(p.GET, {"Name": name}))["Volume"])

    async def list(self) -> list[dict[str, Any]]:
        return list((await self.call(p.LIST, {})).get("Volumes") or [])
