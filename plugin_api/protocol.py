"""The Docker VolumeDriver plugin protocol: endpoint names, request parsing and
validation, response shapes, and `VolumeDriver`, the interface the server serves.
Shared by the server and the client so both speak exactly what Docker Engine
20.10 speaks (see DESIGN.md): POST, JSON bodies sent without a Content-Type,
`Opts` possibly null, errors as `{"Err": "..."}`.

`VolumeDriver` is a `typing.Protocol`, so an implementation (strata's volume
manager, a test double, a future shared backend) satisfies it by its shape and
never imports this package: the dependency stays plugin_api -> nothing below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.errors import StrataError
from common.parsing import load_json

# Where Docker looks for plugins, and the name strata's own plugin goes by.
DEFAULT_NAME = "strata"
SOCKET_DIR = Path("/run/docker/plugins")
SPEC_DIR = Path("/etc/docker/plugins")

ACCEPT = "application/vnd.docker.plugins.v1.2+json"
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
# Docker's requests are a few hundred bytes; anything near this is not a client we know.
MAX_BODY = 64 * 1024

ACTIVATE = "/Plugin.Activate"
CREATE = "/VolumeDriver.Create"
REMOVE = "/VolumeDriver.Remove"
MOUNT = "/VolumeDriver.Mount"
UNMOUNT = "/VolumeDriver.Unmount"
PATH = "/VolumeDriver.Path"
GET = "/VolumeDriver.Get"
LIST = "/VolumeDriver.List"
CAPABILITIES = "/VolumeDriver.Capabilities"
ENDPOINTS = (ACTIVATE, CREATE, REMOVE, MOUNT, UNMOUNT, PATH, GET, LIST, CAPABILITIES)

IMPLEMENTS = {"Implements": ["VolumeDriver"]}


class ProtocolError(StrataError):
    """A request that is not valid VolumeDriver protocol; answered with Err."""


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request object. Docker sends an empty body to Activate and `{}` to List and
    Capabilities, with no Content-Type, so the bytes are parsed whatever the headers say."""
    if len(raw) > MAX_BODY:
        raise ProtocolError(f"request body too large ({len(raw)} bytes, limit {MAX_BODY})")
    if not raw.strip():
        return {}
    body = load_json(raw, "request body")  # nesting bounded: a one-line Err, never a RecursionError
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ProtocolError(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def _field(body: dict[str, Any], key: str) -> str:
    if key not in body or body[key] is None:
        raise ProtocolError(f"missing field {key!r}")
    value = body[key]
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be a string, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class CreateRequest:
    name: str
    opts: object  # checked by the driver: an object of strings, or null

    @classmethod
    def parse(cls, body: dict[str, Any]) -> CreateRequest:
        return cls(_field(body, "Name"), body.get("Opts"))


@dataclass(frozen=True)
class NameRequest:
    """Remove, Path and Get."""

    name: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> NameRequest:
        return cls(_field(body, "Name"))


@dataclass(frozen=True)
class MountRequest:
    """Mount and Unmount: ID names one use of the volume (random per mount in Docker)."""

    name: str
    id: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> MountRequest:
        return cls(_field(body, "Name"), _field(body, "ID"))


class VolumeInfo(Protocol):
    """One volume as Get and List describe it (go-plugins-helpers' `Volume`)."""

    @property
    def name(self) -> str: ...
    @property
    def mountpoint(self) -> Path: ...
    @property
    def created_at(self) -> str: ...
    @property
    def status(self) -> Mapping[str, Any]: ...


class VolumeDriver(Protocol):
    """What the server needs from a volume driver: one method per endpoint, in the shape
    of go-plugins-helpers' `volume.Driver`, the request fields as typed arguments (parsed
    and checked by `CreateRequest`, `NameRequest`, `MountRequest`) and the response as the
    typed result. Methods may block (the server runs them in worker threads) and fail
    with a StrataError, whose one-line message Docker gets as `Err`."""

    @property
    def scope(self) -> str:
        """Capabilities' Scope: "local" (a name means data on this host) or "global"
        (the same data on every host, as a cluster-backed driver offers)."""
        ...

    def recover(self) -> list[str]:
        """Called once before the socket opens: after a restart Docker calls Get for every
        volume it knows at once, so the state must already be whole. One line per repair."""
        ...

    def create(self, name: str, opts: object) -> object:
        """Create; `opts` is Docker's `Opts` as sent (an object of strings, or null), checked
        by the driver. Creating a volume that exists with the same options succeeds.
        The result is not used."""
        ...

    def remove(self, name: str) -> None: ...

    def mount(self, name: str, mount_id: str) -> Path:
        """Take a reference for `mount_id` (random per mount in Docker); the Mountpoint,
        which must exist on the host."""
        ...

    def unmount(self, name: str, mount_id: str) -> None: ...

    def path(self, name: str) -> Path: ...

    def get(self, name: str) -> VolumeInfo:
        """The volume with its Status. Failing makes Docker make a local volume of the same
        name, so fail only for a name the driver really does not know."""
        ...

    def list_volumes(self) -> Sequence[VolumeInfo]:
        """Every volume. List needs no Status (one left empty is not sent): skip the
        work of filling it."""
        ...


def volume_object(vol: VolumeInfo) -> dict[str, Any]:
    """The `Volume` object of Get (with Status) and List (without)."""
    out: dict[str, Any] = {"Name": vol.name, "Mountpoint": str(vol.mountpoint), "CreatedAt": vol.created_at}
    if vol.status:
        out["Status"] = dict(vol.status)
    return out


def capabilities(scope: str) -> dict[str, Any]:
    return {"Capabilities": {"Scope": scope}}


def error(message: str) -> dict[str, Any]:
    return {"Err": message}


def encode(body: dict[str, Any]) -> bytes:
    """JSON plus a newline, as Docker's own plugin helpers write it."""
    return json.dumps(body).encode() + b"\n"
