"""The default driver: a directory under the volume root, like Docker's `local`.
With `size=` the directory is instead the mountpoint of the volume's own ext4
image (see loopfs), mounted on the first Mount and released after the last
Unmount, so the kernel enforces the limit; its data stays in the image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common import kernel
from common.errors import StrataError

from .. import loopfs
from ..options import check_size, owner_and_mode
from ..state import VolumeRecord
from ..usage import UNKNOWN, tree_size
from .base import DATA, Driver, DriverContext, set_owner_and_mode, unmount_quietly

IMAGE = "disk.img"


class LocalDriver(Driver):
    type = "local"
    accepted = frozenset({"uid", "gid", "mode", "size"})

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        owner_and_mode(opts, 0o755)
        if "size" in opts:
            fs = os.statvfs(ctx.root)
            room = fs.f_bavail * fs.f_frsize
            size = check_size(opts["size"], room, "the free space on the volume root's filesystem",
                              ctx.config.max_size)
            if size < loopfs.MIN_SIZE:
                raise StrataError(f"size {opts['size']} is too small for a local volume (minimum 8m)")
            loopfs.check_tools()
            opts = {**opts, "size": str(size)}
        return opts

    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        data = staging / DATA
        data.mkdir()
        if "size" in rec.options:
            size = int(rec.options["size"])
            loopfs.make_image(staging / IMAGE, size, data, *owner_and_mode(rec.options, 0o755))
        else:
            set_owner_and_mode(data, *owner_and_mode(rec.options, 0o755))

    def mounts_on_use(self, rec: VolumeRecord) -> bool:
        return "size" in rec.options

    def is_provisioned(self, rec: VolumeRecord, vdir: Path) -> bool:
        return not self.mounts_on_use(rec) or kernel.is_mountpoint(vdir / DATA)

    def provision(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> None:
        if not self.is_provisioned(rec, vdir):
            loopfs.mount_image(vdir / IMAGE, vdir / DATA)

    def release(self, rec: VolumeRecord, vdir: Path) -> None:
        if self.mounts_on_use(rec):
            unmount_quietly(vdir / DATA)

    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        if self.mounts_on_use(rec):
            raise StrataError(
                f"volume {rec.name} has a size limit (its data lives in a filesystem image), "
                "so it cannot be a clone source"
            )
        return [vdir / DATA]

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        if not self.mounts_on_use(rec):
            return {"Size": tree_size(vdir / DATA)}
        out: dict[str, Any] = {"SizeLimit": int(rec.options["size"]), "Size": UNKNOWN}
        if self.is_provisioned(rec, vdir):
            out["Size"] = tree_size(vdir / DATA)
        return out
