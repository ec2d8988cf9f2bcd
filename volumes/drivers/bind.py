"""A volume that is an existing host directory, allowed only below the roots the
administrator listed in the volume config (`bind_roots`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from common.errors import StrataError

from ..state import VolumeRecord
from ..usage import UNKNOWN, tree_size
from .base import Driver, DriverContext, open_layer


def _check_device(device: str, ctx: DriverContext) -> Path:
    """The real path of device, which must be a directory at or below an allowed root."""
    if not os.path.isabs(device):
        raise StrataError(f"bind device {device!r} must be an absolute path")
    if not ctx.config.bind_roots:
        raise StrataError("bind volumes are disabled: no bind_roots in the volume config")
    real = Path(os.path.realpath(device))
    if not any(real == root or root in real.parents for root in ctx.config.bind_roots):
        roots = ", ".join(str(r) for r in ctx.config.bind_roots)
        raise StrataError(f"bind device {device} is outside the allowed roots ({roots})")
    if not real.is_dir():
        raise StrataError(f"bind device {device} is not an existing directory")
    return real


def _recheck(rec: VolumeRecord, ctx: DriverContext) -> Path:
    """The recorded device, checked again: at every first Mount of the volume and whenever a
    clone stacks it, since a symlink swapped in since create must not lead out."""
    device = Path(rec.options["device"])
    if _check_device(str(device), ctx) != device:
        raise StrataError(f"bind device {device} now resolves elsewhere; refusing")
    return device


class BindDriver(Driver):
    type = "bind"
    # Owner and mode stay the host directory's: changing them would change the host.
    accepted = frozenset({"device"})

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        if "device" not in opts:
            raise StrataError("type=bind needs device=/host/path")
        return {**opts, "device": str(_check_device(opts["device"], ctx))}

    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        """Nothing to make: the data is the host directory."""

    def mountpoint(self, rec: VolumeRecord, vdir: Path) -> Path:
        return Path(rec.options["device"])

    def provision(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> None:
        _recheck(rec, ctx)

    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        return [_recheck(rec, ctx)]

    def reclaimable(self, rec: VolumeRecord, vdir: Path) -> int:
        """Nothing: removing the volume leaves the host directory (and spares the walk)."""
        return 0

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        """Size is counted only through the recorded device itself: a symlink swapped in for
        it (or for a directory above it) would lead the walk elsewhere, so then it is -1."""
        out: dict[str, Any] = {"Device": rec.options["device"], "Size": UNKNOWN}
        with contextlib.suppress(StrataError):
            fd = open_layer(Path(rec.options["device"]))
            try:
                out["Size"] = tree_size(fd)
            finally:
                os.close(fd)
        return out
