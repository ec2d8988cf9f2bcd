"""Crash-safe volume state on disk.

Layout under the volume root (``<state root>/volumes``)::

    .lock                 flock: shared for mount/unmount, exclusive to create/remove
    NAME/volume.json      the record (type, options, labels, created, mount refs)
    NAME/lock             flock: one mount/unmount at a time on this volume
    NAME/...              the driver's files (_data, upper, work)
    .new-XXXX/ .trash-XXXX/   a create or remove in flight

Every change is a write to a temp file, fsync, rename over the old one and an
fsync of the directory, so a kill -9 or a power cut at any moment leaves the
old record or the new one, never a torn one. A volume appears by renaming a
fully built ``.new-`` directory to its name and disappears by renaming it to
``.trash-`` first, so nothing half-made is ever visible under a volume name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unionfs import kernel
from unionfs.errors import StrataError

from .names import check_name

RECORD = "volume.json"
FORMAT_VERSION = 1


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

    @property
    def refs(self) -> int:
        return sum(self.mounts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "Version": FORMAT_VERSION, "Name": self.name, "Type": self.type, "Options": self.options,
            "Labels": self.labels, "CreatedAt": self.created_at, "Mounts": self.mounts, "Note": self.note,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VolumeRecord:
        return cls(
            name=raw["Name"], type=raw["Type"], options=dict(raw.get("Options") or {}),
            labels=dict(raw.get("Labels") or {}), created_at=raw["CreatedAt"],
            mounts={str(k): int(v) for k, v in (raw.get("Mounts") or {}).items()}, note=raw.get("Note", ""),
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path with data so that readers and crashes see the old or the new content only."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    # A fresh open per holder: flock belongs to the open file description, so this excludes
    # other threads of this process as well as other processes.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """rm -rf that first detaches anything still mounted inside, so it never deletes
    through a mount into a tmpfs, a FUSE upper or a host directory."""
    prefix = str(path.resolve())
    inside = [t for _, t, _, _ in kernel.mounts() if t == prefix or t.startswith(prefix + "/")]
    for target in sorted(inside, key=len, reverse=True):
        with contextlib.suppress(OSError):
            kernel.umount(target, kernel.MNT_DETACH)
    shutil.rmtree(path, ignore_errors=True)


class VolumeStore:
    """The records under one volume root, and the locks that order changes to them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def volume_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def lock_all(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return _flock(self.root / ".lock", exclusive)

    def lock_volume(self, name: str) -> contextlib.AbstractContextManager[None]:
        return _flock(self.volume_dir(name) / "lock", True)

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
            os.chmod(tmp, 0o711)
            yield tmp
            write_atomic(tmp / RECORD, self._encode(rec))
            _fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            remove_tree(tmp)
            raise
        _fsync_dir(self.root)

    def discard(self, name: str) -> None:
        """Make name vanish at once, then delete its files. Call under lock_all(True)."""
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
        os.rename(self.volume_dir(name), trash / name)
        _fsync_dir(self.root)
        remove_tree(trash)

    def sweep(self) -> list[str]:
        """Delete what creates and removes cut short by a crash left behind. Call under lock_all(True)."""
        leftovers = [e.name for e in os.scandir(self.root) if e.name.startswith((".new-", ".trash-"))]
        for name in leftovers:
            remove_tree(self.root / name)
        return leftovers
