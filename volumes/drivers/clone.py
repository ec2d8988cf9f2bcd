"""A copy-on-write snapshot of another volume through strata-unionfs: the source's
content is the read-only lower layer stack, and the clone's own writes go to a
private upper directory. The source is never written; it cannot be removed while
a clone depends on it (the manager checks).

The source stays live under a mounted clone (README, "clone"): a directory's
listing is read once, when the clone first looks into it; a file the clone has
not written is read from the source at read time; names replaced in the source
afterwards are not followed. Every layer is checked at each mount by the driver
that owns it (a bind device against `bind_roots`, as its own Mount would), and
the lower layers reach strata-unionfs as descriptors of the checked directories
(`/proc/self/fd/N`), so a symlink swapped in after the check is never mounted.
Mounting, the liveness test and unmounting are the mount program's one client's
(`unionfs.client`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common import kernel
from common.errors import StrataError
from unionfs import client

from ..options import owner_and_mode
from ..state import VolumeRecord
from ..usage import tree_size
from .base import DATA, Driver, DriverContext, open_layer, set_owner_and_mode, unmount_quietly

UPPER = "upper"
WORK = "work"


class CloneDriver(Driver):
    type = "clone"
    accepted = frozenset({"from", "uid", "gid", "mode"})

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

    def mounts_on_use(self, rec: VolumeRecord) -> bool:
        return True

    def is_provisioned(self, rec: VolumeRecord, vdir: Path) -> bool:
        """Mounted and answering (a mount whose daemon died is not)."""
        return client.alive(vdir / DATA)

    def provision(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> None:
        if self.is_provisioned(rec, vdir):
            return
        if kernel.is_mountpoint(vdir / DATA):  # a dead daemon's mount: detach, then mount afresh
            unmount_quietly(vdir / DATA)
        real = Path(os.path.realpath(vdir))
        try:
            # Every layer checked now by its owner, down the chain of sources (Driver.layers).
            upper, *lowers = self.layers(rec, real, ctx)
        except StrataError as e:
            raise StrataError(f"cannot mount clone {rec.name}: {e}") from None
        work = real / WORK
        fds: list[int] = []
        try:
            for layer in (upper, work, *lowers):
                fds.append(open_layer(layer))
            # Every layer goes as the checked directory itself (the child inherits the
            # descriptors and opens each through /proc/self/fd/N).
            upper_o, work_o, *lower_o = (f"/proc/self/fd/{fd}" for fd in fds)
            client.mount(client.Union(lower_o, upper_o, work_o), vdir / DATA,
                         prog=ctx.config.unionfs, pass_fds=fds)
        except (StrataError, OSError) as e:
            raise StrataError(f"cannot mount clone {rec.name}: {e}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def release(self, rec: VolumeRecord, vdir: Path) -> None:
        unmount_quietly(vdir / DATA)

    def depends_on(self, rec: VolumeRecord) -> str | None:
        return rec.options.get("from")

    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        return [vdir / UPPER, *ctx.layers_of(rec.options["from"])]

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        return {"From": rec.options["from"], "Size": tree_size(vdir / UPPER)}
