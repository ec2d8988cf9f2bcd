"""The default driver: a directory under the volume root, like Docker's `local`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..options import owner_and_mode
from ..state import VolumeRecord
from ..usage import tree_size
from .base import DATA, Driver, DriverContext, set_owner_and_mode


class LocalDriver(Driver):
    type = "local"
    accepted = frozenset({"uid", "gid", "mode"})

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        owner_and_mode(opts, 0o755)
        return opts

    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        data = staging / DATA
        data.mkdir()
        set_owner_and_mode(data, *owner_and_mode(rec.options, 0o755))

    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        return [vdir / DATA]

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        return {"Size": tree_size(vdir / DATA)}
