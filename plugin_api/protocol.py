"""The Docker VolumeDriver plugin protocol: endpoint names, request parsing and
validation, response shapes. Shared by the server and the client so both speak
exactly what Docker Engine 20.10 speaks (see DESIGN.md): POST, JSON bodies sent
without a Content-Type, `Opts` possibly null, errors as `{"Err": "..."}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import StrataError
from common.parsing import load_json
from volumes import Volume

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
CAPABILITIES_RESPONSE = {"Capabilities": {"Scope": "local"}}


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
    opts: object  # checked by the volume manager: an object of strings, or null

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


def volume_object(vol: Volume) -> dict[str, Any]:
    """The `Volume` object of Get (with Status) and List (without)."""
    out: dict[str, Any] = {"Name": vol.name, "Mountpoint": str(vol.mountpoint), "CreatedAt": vol.created_at}
    if vol.status:
        out["Status"] = vol.status
    return out


def error(message: str) -> dict[str, Any]:
    return {"Err": message}


def encode(body: dict[str, Any]) -> bytes:
    """JSON plus a newline, as Docker's own plugin helpers write it."""
    return json.dumps(body).encode() + b"\n"
