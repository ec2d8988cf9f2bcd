"""Crash-safe volume state on disk.

Layout under the volume root (``<state root>/volumes``)::

    .lock                 flock: shared for mount/unmount, exclusive to create/remove
    NAME/volume.json      the record (type, options, labels, created, mount refs)
    NAME/lock             flock: one mount/unmount at a time on this volume
    NAME/...              the driver's files (_data, upper, work)
    .new-XXXX/ .trash-XXXX/   a create or remove in flight

Every change of a record is `common.atomic.write_atomic` (a unique temp file,
fsync, rename over the old one, fsync of the directory), so a kill -9 or a power
cut at any moment leaves the old record or the new one, never a torn one. A volume appears by renaming a
fully built ``.new-`` directory to its name and disappears by renaming it to
``.trash-`` first, so nothing half-made is ever visible under a volume name.
The volume root and every ``NAME/`` are 0710 (``common.paths.STATE_ROOT_MODE``): no
host user but root reaches a volume's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import kernel
from common.atomic import fsync_dir, write_atomic
from common.errors import StrataError
from common.paths import STATE_ROOT_MODE, private_dir
from common.tree import remove_path

from .names import check_name

RECORD = "volume.json"
FORMAT_VERSION = 1


def current_boot() -> str:
    """The kernel's random id of this boot: a record's references from another boot are stale."""
    return kernel.boot_id()


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class VolumeRecord:
    """What is persisted about one volume; ``mounts`` maps mount ID to its reference count."""

    name: str
    type: str
    options: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=now_rfc3339)
    mounts: dict[str, int] = field(default_factory=dict)
    note: str = ""  # what the last recovery had to do, shown in Status
    boot: str = ""  # the kernel boot the references were taken in: none survives a reboot

    @property
    def refs(self) -> int:
        return sum(self.mounts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "Version": FORMAT_VERSION, "Name": self.name, "Type": self.type, "Options": self.options,
            "Labels": self.labels, "CreatedAt": self.created_at, "Mounts": self.mounts, "Note": self.note,
            "Boot": self.boot,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VolumeRecord:
        return cls(
            name=raw["Name"], type=raw["Type"], options=dict(raw.get("Options") or {}),
            labels=dict(raw.get("Labels") or {}), created_at=raw["CreatedAt"],
            mounts={str(k): int(v) for k, v in (raw.get("Mounts") or {}).items()}, note=raw.get("Note", ""),
            boot=raw.get("Boot", ""),
        )


@contextlib.contextmanager
def flock(path: Path, exclusive: bool) -> Iterator[None]:
    # A fresh open per holder: flock belongs to the open file description, so this excludes
    # other threads of this process as well as other processes.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def remove_tree(path: Path) -> bool:
    """rm -rf that first detaches anything still mounted inside, so it never deletes
    through a mount into a tmpfs, a FUSE upper or a host directory; however deep the tree
    (a container can make it 5,000 levels deep), nothing followed. False, leaving the rest
    for the next sweep, when something cannot go (a mount that would not detach)."""
    prefix = str(path.resolve())
    inside = [t for _, t, _, _ in kernel.mounts() if t == prefix or t.startswith(prefix + "/")]
    for target in sorted(inside, key=len, reverse=True):
        with contextlib.suppress(OSError):
            kernel.umount(target, kernel.MNT_DETACH)
    try:
        remove_path(path)
    except OSError:
        return False
    return True


class VolumeStore:
    """The records under one volume root, and the locks that order changes to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # On the way to every volume's mountpoint: traversable by the group only (common.paths).
        private_dir(root, STATE_ROOT_MODE)

    def volume_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def lock_all(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return flock(self.root / ".lock", exclusive)

    def lock_volume(self, name: str) -> contextlib.AbstractContextManager[None]:
        return flock(self.volume_dir(name) / "lock", True)

    def exists(self, name: str) -> bool:
        return (self.volume_dir(name) / RECORD).exists()

    def names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_dir())

    def load(self, name: str) -> VolumeRecord | None:
        """The record of name, or None when no such volume exists."""
        path = self.volume_dir(name) / RECORD
        try:
            raw = json.loads(path.read_bytes())
            return VolumeRecord.from_json(raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StrataError(f"volume {name}: unreadable state {path}: {e}") from None

    def save(self, rec: VolumeRecord) -> None:
        write_atomic(self.volume_dir(rec.name) / RECORD, self._encode(rec))

    @staticmethod
    def _encode(rec: VolumeRecord) -> bytes:
        return json.dumps(rec.to_json(), indent=1, sort_keys=True).encode() + b"\n"

    @contextlib.contextmanager
    def staging(self, rec: VolumeRecord) -> Iterator[Path]:
        """A private directory to build the volume in; on a clean exit it is renamed to the
        volume's name with its record, on an error it is removed. Call under lock_all(True)."""
        final = self.volume_dir(rec.name)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))
        try:
            os.chmod(tmp, STATE_ROOT_MODE)
            yield tmp
            write_atomic(tmp / RECORD, self._encode(rec))  # fsyncs tmp too: the record is in it
            os.rename(tmp, final)
        except BaseException:
            remove_tree(tmp)
            raise
        fsync_dir(self.root)

    def discard(self, name: str) -> None:
        """Make name vanish at once, then delete its files (what cannot go yet stays in a
        `.trash-` directory for the next sweep). Call under lock_all(True)."""
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
        os.rename(self.volume_dir(name), trash / name)
        fsync_dir(self.root)
        remove_tree(trash)

    def sweep(self) -> list[str]:
        """Delete what creates and removes cut short by a crash left behind, whatever they
        hold; one line per leftover. Call under lock_all(True)."""
        leftovers = [e.name for e in os.scandir(self.root) if e.name.startswith((".new-", ".trash-"))]
        done = {name: remove_tree(self.root / name) for name in leftovers}
        return [f"removed leftover {n}" if gone else f"could not remove leftover {n} yet"
                for n, gone in done.items()]
