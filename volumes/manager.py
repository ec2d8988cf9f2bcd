"""The volume manager: every operation the plugin endpoints and the `strata
volume` commands perform, on state shared through the volume root.

No state lives in memory: each call reads the records it needs under the
store's locks and writes changes back atomically, so the plugin service, any
number of CLI processes and a service restarted after kill -9 all see one truth.
Mount references are counted per mount ID: the first Mount of a volume
provisions it (mounts the tmpfs or the clone), the last Unmount releases it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unionfs.errors import StrataError
from unionfs.paths import state_root

from .config import VolumeConfig
from .drivers import DEFAULT_TYPE, Driver, DriverContext, driver_for, refuse_unknown
from .names import check_mount_id, check_name
from .options import check_options
from .state import VolumeRecord, VolumeStore, now_rfc3339


class NoSuchVolume(StrataError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no such volume: {name}")


@dataclass
class Volume:
    """A volume as clients see it."""

    name: str
    type: str
    mountpoint: Path
    created_at: str
    options: dict[str, str]
    labels: dict[str, str]
    status: dict[str, Any] = field(default_factory=dict)

    def to_docker(self) -> dict[str, Any]:
        """The `Volume` object of the VolumeDriver protocol (Get, List)."""
        out: dict[str, Any] = {
            "Name": self.name, "Mountpoint": str(self.mountpoint), "CreatedAt": self.created_at,
        }
        if self.status:
            out["Status"] = self.status
        return out


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    clean = dict(labels or {})
    for k, v in clean.items():
        if not k or "\0" in k or "\0" in v:
            raise StrataError(f"invalid label {k!r}")
    return clean


class VolumeManager:
    def __init__(self, root: Path, config: VolumeConfig | None = None) -> None:
        self.store = VolumeStore(root)
        self.config = config or VolumeConfig()
        self.ctx = DriverContext(self.config, self._layers_of)

    @classmethod
    def open(cls, root: str | None = None, config: str | None = None) -> VolumeManager:
        """The manager of `<state root>/volumes` with the configured settings."""
        return cls(state_root(root) / "volumes", VolumeConfig.load(config))

    # -- reading -------------------------------------------------------------------------

    def _load(self, name: str) -> VolumeRecord:
        rec = self.store.load(check_name(name))
        if rec is None:
            raise NoSuchVolume(name)
        return rec

    def _volume(self, rec: VolumeRecord, with_status: bool) -> Volume:
        drv = driver_for(rec.type)
        vdir = self.store.volume_dir(rec.name)
        vol = Volume(rec.name, rec.type, drv.mountpoint(rec, vdir), rec.created_at, rec.options, rec.labels)
        if with_status:
            vol.status = {
                "Type": rec.type,
                "Mounted": drv.is_provisioned(rec, vdir) if drv.mounts else rec.refs > 0,
                "MountCount": rec.refs,
                "MountIDs": len(rec.mounts),
                **drv.status(rec, vdir),
            }
            if rec.note:
                vol.status["Note"] = rec.note
        return vol

    def get(self, name: str) -> Volume:
        """The volume with its Status; NoSuchVolume only when no record of it exists."""
        return self._volume(self._load(name), with_status=True)

    def list_volumes(self, with_status: bool = False) -> list[Volume]:
        out = []
        for name in self.store.names():
            rec = self.store.load(name)
            if rec is not None:  # removed while we listed
                out.append(self._volume(rec, with_status))
        return out

    def path(self, name: str) -> Path:
        rec = self._load(name)
        return driver_for(rec.type).mountpoint(rec, self.store.volume_dir(name))

    def _layers_of(self, name: str) -> list[Path]:
        rec = self._load(name)
        return driver_for(rec.type).layers(rec, self.store.volume_dir(name), self.ctx)

    def _dependents(self, name: str) -> list[str]:
        return [
            r.name for r in (self.store.load(n) for n in self.store.names())
            if r is not None and r.type == "clone" and r.options.get("from") == name
        ]

    # -- changing ------------------------------------------------------------------------

    def create(self, name: str, opts: object = None, labels: Mapping[str, str] | None = None) -> Volume:
        """Create a volume; creating one that exists with the same options is a no-op, as in Docker."""
        check_name(name)
        clean = check_options(opts)
        type_ = clean.pop("type", DEFAULT_TYPE)
        drv = driver_for(type_)
        refuse_unknown(type_, clean, drv.accepted)
        lab = _check_labels(labels)
        with self.store.lock_all(exclusive=True):
            clean = drv.validate(name, clean, self.ctx)
            existing = self.store.load(name)
            if existing is not None:
                if existing.type == type_ and existing.options == clean:
                    return self._volume(existing, with_status=False)
                raise StrataError(f"volume {name} already exists with different options")
            rec = VolumeRecord(name=name, type=type_, options=clean, labels=lab)
            with self.store.staging(rec) as staging:
                drv.build(rec, staging, self.ctx)
        return self._volume(rec, with_status=False)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[tuple[VolumeRecord, Driver, Path]]:
        """One volume under its own lock, while no create/remove runs (they take lock_all)."""
        with self.store.lock_all(exclusive=False):
            self._load(name)
            with self.store.lock_volume(name):
                rec = self._load(name)
                yield rec, driver_for(rec.type), self.store.volume_dir(name)

    def mount(self, name: str, mount_id: str) -> Path:
        """Take a reference for mount_id; the first reference provisions the volume."""
        check_mount_id(mount_id)
        with self._locked(name) as (rec, drv, vdir):
            drv.provision(rec, vdir, self.ctx)
            rec.mounts[mount_id] = rec.mounts.get(mount_id, 0) + 1
            self.store.save(rec)
            return drv.mountpoint(rec, vdir)

    def unmount(self, name: str, mount_id: str) -> None:
        """Drop a reference of mount_id; the last reference releases the volume."""
        check_mount_id(mount_id)
        with self._locked(name) as (rec, drv, vdir):
            if mount_id not in rec.mounts:
                raise StrataError(f"volume {name} is not mounted with ID {mount_id}")
            rec.mounts[mount_id] -= 1
            if not rec.mounts[mount_id]:
                del rec.mounts[mount_id]
            if not rec.refs:
                drv.release(rec, vdir)
                rec.note = ""
            self.store.save(rec)

    def _remove_locked(self, rec: VolumeRecord) -> None:
        if rec.refs:
            raise StrataError(f"volume {rec.name} is in use ({rec.refs} mount reference(s))")
        deps = self._dependents(rec.name)
        if deps:
            raise StrataError(f"volume {rec.name} is cloned by {', '.join(deps)}; remove those first")
        driver_for(rec.type).release(rec, self.store.volume_dir(rec.name))
        self.store.discard(rec.name)

    def remove(self, name: str) -> None:
        """Remove an unused volume and its data; refused while mounted or cloned from."""
        with self.store.lock_all(exclusive=True):
            self._remove_locked(self._load(name))

    def prune(self) -> list[tuple[str, int]]:
        """Remove every volume without mount references (clones before their sources);
        returns (name, bytes freed) for each."""
        removed: list[tuple[str, int]] = []
        with self.store.lock_all(exclusive=True):
            self.store.sweep()
            progress = True
            while progress:
                progress = False
                for name in self.store.names():
                    rec = self.store.load(name)
                    if rec is None or rec.refs or self._dependents(name):
                        continue
                    size = int(self._volume(rec, with_status=True).status.get("Size") or 0)
                    if rec.type == "bind":
                        size = 0  # the host directory stays
                    self._remove_locked(rec)
                    removed.append((name, size))
                    progress = True
        return removed

    def recover(self) -> list[str]:
        """Bring the kernel in line with the records after a crash or reboot: remount
        referenced tmpfs/clone volumes that are not mounted, release mounted ones nobody
        references, delete half-done creates/removes. Returns what it did, one line each."""
        with self.store.lock_all(exclusive=True):
            report = [f"removed leftover {n}" for n in self.store.sweep()]
            for name in self.store.names():
                rec = self.store.load(name)
                if rec is None:
                    continue
                drv, vdir = driver_for(rec.type), self.store.volume_dir(name)
                if not drv.mounts:
                    continue
                mounted = drv.is_provisioned(rec, vdir)
                if rec.refs and not mounted:
                    try:
                        drv.provision(rec, vdir, self.ctx)
                        lost = " (a tmpfs: its previous content was lost)" if rec.type == "tmpfs" else ""
                        rec.note = f"mounted again on recovery at {now_rfc3339()}{lost}"
                    except StrataError as e:
                        rec.note = f"could not be mounted again on recovery: {e}"
                    self.store.save(rec)
                    report.append(f"volume {name}: {rec.note}")
                elif mounted and not rec.refs:
                    drv.release(rec, vdir)
                    report.append(f"volume {name}: released a mount no ID references")
        return report
