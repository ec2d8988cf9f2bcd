"""A copy-on-write snapshot of another volume through strata-unionfs: the source's
content is the read-only lower layer stack, and the clone's own writes go to a
private upper directory. The source is never written; it cannot be removed while
a clone depends on it (the manager checks). Files the clone has not changed
show the source's current content, as with any overlay lower layer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from unionfs import kernel
from unionfs.errors import StrataError

from ..options import owner_and_mode
from ..state import VolumeRecord
from ..usage import tree_size
from .base import DATA, Driver, DriverContext, set_owner_and_mode, unmount_quietly

UPPER = "upper"
WORK = "work"
_MOUNT_TIMEOUT = 60


def unionfs_program(configured: str | None) -> str:
    """The strata-unionfs of the running install (beside this Python), else the one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).with_name("strata-unionfs")
    if beside.exists():
        return str(beside)
    found = shutil.which("strata-unionfs")
    if not found:
        raise StrataError("strata-unionfs not found (install strata, or set unionfs in the volume config)")
    return found


def _layer_option(layers: list[Path]) -> str:
    for layer in layers:
        if any(c in str(layer) for c in ",:\n"):
            raise StrataError(f"cannot use {layer} as a clone layer: the path holds ',' or ':'")
    return ":".join(str(layer) for layer in layers)


class CloneDriver(Driver):
    type = "clone"
    accepted = frozenset({"from", "uid", "gid", "mode"})
    mounts = True

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        if "from" not in opts:
            raise StrataError("type=clone needs from=SOURCE_VOLUME")
        owner_and_mode(opts, 0o755)
        ctx.layers_of(opts["from"])  # the source must exist and be clonable
        return opts

    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        for sub in (UPPER, WORK, DATA):
            (staging / sub).mkdir(mode=0o755)
        if {"uid", "gid", "mode"} & set(rec.options):
            set_owner_and_mode(staging / UPPER, *owner_and_mode(rec.options, 0o755))

    def is_provisioned(self, rec: VolumeRecord, vdir: Path) -> bool:
        return kernel.is_mountpoint(vdir / DATA)

    def provision(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> None:
        if self.is_provisioned(rec, vdir):
            return
        lower = _layer_option(ctx.layers_of(rec.options["from"]))
        upper, work = vdir / UPPER, vdir / WORK
        _layer_option([upper, work, vdir / DATA])
        argv = [
            unionfs_program(ctx.config.unionfs), "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
            str(vdir / DATA),
        ]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=_MOUNT_TIMEOUT,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StrataError(f"cannot mount clone {rec.name}: {e}") from None
        if res.returncode != 0 or not self.is_provisioned(rec, vdir):
            reason = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
            raise StrataError(f"cannot mount clone {rec.name}: strata-unionfs: {reason}")

    def release(self, rec: VolumeRecord, vdir: Path) -> None:
        unmount_quietly(vdir / DATA)

    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        return [vdir / UPPER, *ctx.layers_of(rec.options["from"])]

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        return {"From": rec.options["from"], "Size": tree_size(vdir / UPPER)}
