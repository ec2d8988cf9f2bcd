"""What every volume driver provides to the manager.

A driver owns the files inside one volume's directory and the meaning of its
options. The manager does the bookkeeping (names, records, reference counts,
locks) and calls the driver at these points: ``validate`` and ``build`` at
create time (``build`` fills a private staging directory), ``provision`` on the
first Mount and ``release`` after the last Unmount, ``layers`` when another
volume is cloned from this one. What the manager must know of a type it asks
through hooks (``mounts_on_use``, ``keeps_data_unmounted``, ``depends_on``,
``reclaimable``) rather than by its name.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from common.errors import StrataError
from unionfs import client

from ..config import VolumeConfig
from ..state import VolumeRecord

DATA = "_data"


@dataclass(frozen=True)
class DriverContext:
    config: VolumeConfig
    # The content of another volume as overlay lower layers, top first (for clones).
    layers_of: Callable[[str], list[Path]]
    # The volume root: the filesystem a local volume's data (or image) lives on.
    root: Path


class Driver(ABC):
    type: ClassVar[str]
    # Option keys this driver accepts besides "type"; anything else is refused.
    accepted: ClassVar[frozenset[str]]

    def validate(self, name: str, opts: dict[str, str], ctx: DriverContext) -> dict[str, str]:
        """Check the options (types, ranges, references); return them normalised for the record."""
        return opts

    @abstractmethod
    def build(self, rec: VolumeRecord, staging: Path, ctx: DriverContext) -> None:
        """Create the volume's files in its (not yet visible) staging directory."""

    def mountpoint(self, rec: VolumeRecord, vdir: Path) -> Path:
        return vdir / DATA

    def mounts_on_use(self, rec: VolumeRecord) -> bool:
        """True when provisioning is a real mount that a reboot undoes and recovery must redo."""
        return False

    def keeps_data_unmounted(self, rec: VolumeRecord) -> bool:
        """False when the data lives only in the mount (memory): the last Unmount, a crash or
        a reboot takes it, so a recovery's remount starts empty and says so."""
        return True

    def depends_on(self, rec: VolumeRecord) -> str | None:
        """The volume whose content this one stacks (see `layers`): it cannot be removed
        while this one exists. None for a volume that stands alone."""
        return None

    def reclaimable(self, rec: VolumeRecord, vdir: Path) -> int:
        """Bytes removing the volume frees, for prune's report: its counted Size (0 when
        it is not counted)."""
        return max(0, self.status(rec, vdir).get("Size", 0))

    def is_provisioned(self, rec: VolumeRecord, vdir: Path) -> bool:
        return True

    def provision(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> None:  # noqa: B027
        """Make the mountpoint usable (first Mount); must be idempotent."""

    def release(self, rec: VolumeRecord, vdir: Path) -> None:  # noqa: B027
        """Undo provision (last Unmount); must not fail once the users are gone."""

    @abstractmethod
    def layers(self, rec: VolumeRecord, vdir: Path, ctx: DriverContext) -> list[Path]:
        """This volume's content as read-only overlay lower layers, top first: each the real
        path of a directory (no symlink in it), checked now by the driver that owns it, as a
        Mount of this volume would check it (`open_layer` holds the caller to that path)."""

    def status(self, rec: VolumeRecord, vdir: Path) -> dict[str, Any]:
        """Driver details for Get's Status (beyond the manager's common fields)."""
        return {}


def unmount_quietly(target: Path) -> None:
    """Unmount target (unionfs.client's way: a FUSE daemon ends with its mount, a busy
    mount is detached lazily), never failing: Docker ignores Unmount errors, so failing
    here would only leak a reference."""
    with contextlib.suppress(StrataError):
        client.unmount(target)


def open_layer(path: Path) -> int:
    """An O_PATH descriptor of the layer directory at path, a real path a driver has just
    checked: refused if path no longer leads to a directory by exactly that route (a symlink
    or a rename swapped in since the check), so the descriptor holds what the check approved
    whatever later happens to the names."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise StrataError(f"layer {path}: {e.strerror or e}; refusing") from None
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        where = ""
    if where != str(path):
        os.close(fd)
        raise StrataError(f"layer {path} now resolves elsewhere; refusing")
    return fd


def set_owner_and_mode(path: Path, uid: int, gid: int, mode: int) -> None:
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def refuse_unknown(type_: str, opts: dict[str, str], accepted: frozenset[str]) -> None:
    unknown = sorted(set(opts) - accepted - {"type"})
    if not unknown:
        return
    if "size" in unknown:
        raise StrataError(
            f"option size: type={type_} volumes cannot enforce a size limit; type=local and type=tmpfs can"
        )
    allowed = ", ".join(sorted(accepted)) or "none"
    raise StrataError(f"unknown option {unknown[0]!r} for type={type_} (accepted: {allowed})")


def not_mounted_error(what: str, path: Path, err: OSError) -> StrataError:
    return StrataError(f"cannot mount {what} at {path}: {err.strerror or err}")
