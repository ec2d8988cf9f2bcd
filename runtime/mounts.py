"""A container's volumes: parsing `-v`, and getting each one onto the host through a
single interface -- a host directory as it is, a named volume from the in-process
volume manager (created on first use, as docker does), or one from any Docker
volume plugin (`--volume-driver NAME`) through the plugin client."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import StrataError
from volumes import NoSuchVolume, VolumeManager
from volumes.names import check_name

LOCAL_DRIVER = "strata"


@dataclass(frozen=True)
class Mount:
    """One -v: Type "bind" (Source a host path) or "volume" (Name, Driver)."""

    Type: str
    Destination: str
    RW: bool = True
    Source: str = ""
    Name: str = ""
    Driver: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Mount:
        return cls(**d)


def _check_destination(dest: str, spec: str) -> str:
    if not dest.startswith("/"):
        raise StrataError(f"invalid volume specification {spec!r}: the container path must be absolute")
    norm = os.path.normpath(dest)
    if norm == "/":
        raise StrataError(f"invalid volume specification {spec!r}: cannot mount over /")
    return norm


def parse(spec: str, driver: str | None) -> Mount:
    """`NAME:/path[:ro|rw]` or `/host:/path[:ro|rw]` (docker's -v)."""
    parts = spec.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
    if len(parts) != 2 or mode not in ("ro", "rw"):
        raise StrataError(f"invalid volume specification {spec!r}: expected SOURCE:/path[:ro|rw]")
    source, dest = parts
    dest = _check_destination(dest, spec)
    if source.startswith("/"):
        if not os.path.exists(source):
            raise StrataError(f"invalid volume specification {spec!r}: {source} does not exist")
        return Mount("bind", dest, mode == "rw", Source=os.path.realpath(source))
    check_name(source)
    return Mount("volume", dest, mode == "rw", Name=source, Driver=driver or LOCAL_DRIVER)


def with_mode(m: Mount, mode: str | None) -> Mount:
    """A mount taken by --volumes-from, made read-only when asked."""
    if mode is None:
        return m
    if mode not in ("ro", "rw"):
        raise StrataError(f"invalid --volumes-from mode {mode!r}: expected ro or rw")
    return Mount(m.Type, m.Destination, mode == "rw", m.Source, m.Name, m.Driver)


async def _plugin(driver: str, op: str, name: str, mount_id: str) -> str:
    from plugin_api.client import PluginClient, PluginError  # aiohttp: only for plugin volumes

    async with PluginClient.for_plugin(driver) as c:
        if op == "ensure":
            try:
                await c.get(name)
            except PluginError:
                await c.create(name, {})
            return ""
        if op == "mount":
            return await c.mount(name, mount_id)
        await c.unmount(name, mount_id)
        return ""


def ensure(m: Mount, root: str | None) -> None:
    """Create a named volume that does not exist yet (at container create, like docker)."""
    if m.Type != "volume":
        return
    if m.Driver == LOCAL_DRIVER:
        mgr = VolumeManager.open(root)
        try:
            mgr.get(m.Name)
        except NoSuchVolume:
            mgr.create(m.Name)
    else:
        asyncio.run(_plugin(m.Driver, "ensure", m.Name, ""))


def attach(m: Mount, mount_id: str, root: str | None) -> str:
    """The host path to bind for m, taking a volume reference under mount_id."""
    if m.Type == "bind":
        if not os.path.exists(m.Source):
            raise StrataError(f"bind source {m.Source} no longer exists")
        return m.Source
    if m.Driver == LOCAL_DRIVER:
        return str(VolumeManager.open(root).mount(m.Name, mount_id))
    path = asyncio.run(_plugin(m.Driver, "mount", m.Name, mount_id))
    if not os.path.isdir(path):
        raise StrataError(f"volume plugin {m.Driver} gave mountpoint {path!r}, which is not a directory")
    return path


def detach(m: Mount, mount_id: str, root: str | None) -> None:
    if m.Type == "bind":
        return
    if m.Driver == LOCAL_DRIVER:
        VolumeManager.open(root).unmount(m.Name, mount_id)
    else:
        asyncio.run(_plugin(m.Driver, "unmount", m.Name, mount_id))


def copy_image_content(image_dir: str, volume_path: str) -> None:
    """docker's copy-up: an empty volume mounted over a non-empty image directory starts
    with the image's files (owners, modes, symlinks kept)."""
    if not os.path.isdir(image_dir) or os.path.islink(image_dir) or os.listdir(volume_path):
        return
    if not os.listdir(image_dir):
        return
    shutil.copytree(image_dir, volume_path, symlinks=True, dirs_exist_ok=True)
    st = os.stat(image_dir)
    os.chown(volume_path, st.st_uid, st.st_gid)
    os.chmod(volume_path, st.st_mode & 0o7777)
