"""A tmpfs per volume: memory-backed, size-limited by the kernel, mounted on the
first Mount and gone after the last Unmount (as Docker's local driver does with
`type=tmpfs`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from unionfs import kernel
from unionfs.errors import StrataError

from ..options import owner_and_mode, parse_size
from ..state import VolumeRecord
from .base import DATA, Driver, DriverContext, not_mounted_error, unmount_quietly


class TmpfsDriver(Driver):
    type = "tmpfs"
    accepted = frozenset({"size", "uid", "gid", "mode"})
    mounts = True

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        owner_and_mode(opts, 0o755)
        if "size" in opts:
            opts = {**opts, "size": str(parse_size(opts["size"]))}
        return opts

    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        (staging / DATA).mkdir(mode=0o755)

    def is_provisioned(self, rec: VolumeRecord, vdir: Path) -> bool:
        return kernel.is_mountpoint(vdir / DATA)

    def provision(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> None:
        if self.is_provisioned(rec, vdir):
            return
        uid, gid, mode = owner_and_mode(rec.options, 0o755)
        data = f"mode={mode:o},uid={uid},gid={gid}"
        if "size" in rec.options:
            data += f",size={rec.options['size']}"
        try:
            kernel.mount("tmpfs", vdir / DATA, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, data)
        except OSError as e:
            raise not_mounted_error("tmpfs", vdir / DATA, e) from None

    def release(self, rec: VolumeRecord, vdir: Path) -> None:
        unmount_quietly(vdir / DATA)

    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        raise StrataError(f"volume {rec.name} is a tmpfs: its content is not kept, so it cannot be cloned")

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"SizeLimit": int(rec.options["size"]) if "size" in rec.options else None}
        if self.is_provisioned(rec, vdir):
            st = os.statvfs(vdir / DATA)
            out["Size"] = (st.f_blocks - st.f_bfree) * st.f_frsize
        else:
            out["Size"] = 0
        return out
