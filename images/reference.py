"""Image references as docker spells them: `[registry[:port]/]path[:tag][@digest]`.

Local names keep exactly what the user typed (plus `:latest`), so `strata images`
shows what `docker images` would; the registry part matters only to pull/push."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import StrataError
from images.digest import DIGEST_RE

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
_NAME_RE = re.compile(rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_HOLDER_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")

DEFAULT_TAG = "latest"
DOCKER_HUB = "registry-1.docker.io"


@dataclass(frozen=True)
class Reference:
    name: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        """`name:tag` (or `name@digest`): the key images are stored under."""
        if self.digest and not self.tag:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    @property
    def registry(self) -> str:
        first, _, rest = self.name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            return first
        return DOCKER_HUB

    @property
    def repository(self) -> str:
        """The path on the registry (docker hub's official images live under library/)."""
        first, _, rest = self.name.partition("/")
        if self.registry != DOCKER_HUB:
            return rest
        return self.name if rest else f"library/{self.name}"


def parse(ref: str) -> Reference:
    """Split and validate a reference; the tag defaults to latest unless a digest is given."""
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise StrataError(f"invalid reference {ref!r}: bad digest")
    name, tag = rest, None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise StrataError(f"invalid reference {ref!r}: bad tag {tag!r}")
    if not _NAME_RE.match(name) or len(name) > 255:
        raise StrataError(f"invalid reference {ref!r}: want lowercase [a-z0-9._-] components joined by '/'")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(_familiar(name), tag, digest)


def _familiar(name: str) -> str:
    """docker's short form: `docker.io/library/busybox` is `busybox`, as `docker images` shows it."""
    for hub in ("docker.io/", "index.docker.io/"):
        if name.startswith(hub):
            name = name[len(hub) :]
            if name.startswith("library/") and name.count("/") == 1:
                name = name[len("library/") :]
    return name


def valid_holder(name: str) -> bool:
    """Names of image holds (container ids/names, docker's rule): safe as file names."""
    return bool(_HOLDER_RE.match(name))
