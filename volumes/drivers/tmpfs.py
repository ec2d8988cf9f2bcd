"""A tmpfs per volume: memory-backed, size-limited by the kernel, mounted on the
first Mount and gone after the last Unmount (as Docker's local driver does with
`type=tmpfs`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common import kernel
from common.errors import StrataError

from ..options import check_size, owner_and_mode
from ..state import VolumeRecord
from .base import DATA, Driver, DriverContext, not_mounted_error, unmount_quietly


class TmpfsDriver(Driver):
    type = "tmpfs"
    accepted = frozenset({"size", "uid", "gid", "mode"})

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        owner_and_mode(opts, 0o755)
        if "size" in opts:
            # A tmpfs lives in memory: no size above the machine's can be kept.
            ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            size = check_size(opts["size"], ram, "the machine's memory", ctx.config.max_size)
            opts = {**opts, "size": str(size)}
        return opts

    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        (staging / DATA).mkdir(mode=0o755)

    def mounts_on_use(self, rec: VolumeRecord) -> bool:
        return True

    def keeps_data_unmounted(self, rec: VolumeRecord) -> bool:
        return False

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
