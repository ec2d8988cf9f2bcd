"""The volume manager: every operation the plugin endpoints and the `strata
volume` commands perform, on state shared through the volume root.

No state lives in memory: each call reads the records it needs under the
store's locks and writes changes back atomically, so the plugin service, any
number of CLI processes and a service restarted after kill -9 all see one truth.
Mount references are counted per mount ID: the first Mount of a volume
provisions it (whatever its driver mounts), the last Unmount releases it.
What a volume's type means is asked of its driver (`drivers.Driver` hooks),
never spelled here, so a new driver needs no change to the manager.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import kernel
from common.errors import StrataError
from common.paths import STATE_ROOT_MODE, private_dir, state_root

from .config import VolumeConfig
from .drivers import DEFAULT_TYPE, Driver, DriverContext, driver_for, refuse_unknown
from .names import check_mount_id, check_name
from .options import check_options
from .state import VolumeRecord, VolumeStore, current_boot, now_rfc3339


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


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    clean = dict(labels or {})
    for k, v in clean.items():
        if not k or "\0" in k or "\0" in v:
            raise StrataError(f"invalid label {k!r}")
    return clean


class VolumeManager:
    """Every volume operation; by its shape also the `plugin_api.protocol.VolumeDriver`
    that `strata serve` serves (this package does not import plugin_api: it sits below)."""

    # Docker's Capabilities Scope: a volume's name and data belong to this host.
    scope = "local"

    def __init__(self, root: Path, config: VolumeConfig | None = None) -> None:
        self.store = VolumeStore(root)
        self.config = config or VolumeConfig()
        self.ctx = DriverContext(self.config, self._layers_of, root)
        self.boot = current_boot()

    @classmethod
    def open(cls, root: str | None = None, config: str | None = None) -> VolumeManager:
        """The manager of `<state root>/volumes` with the configured settings."""
        top = state_root(root)
        private_dir(os.path.realpath(top), STATE_ROOT_MODE)
        return cls(top / "volumes", VolumeConfig.load(config))

    # -- reading -------------------------------------------------------------------------

    def _load(self, name: str) -> VolumeRecord:
        rec = self.store.load(check_name(name))
        if rec is None:
            raise NoSuchVolume(name)
        self._forget_stale(rec)
        return rec

    def _forget_stale(self, rec: VolumeRecord) -> bool:
        """Drop references taken before the last reboot: their containers are gone, and Docker
        does not Unmount them; it mounts again with the same IDs when it restarts them, so
        keeping them would leave the volume "in use" forever. Persisted by the next save."""
        if not rec.mounts or rec.boot == self.boot:
            return False
        rec.note = f"{rec.refs} mount reference(s) from before a reboot dropped at {now_rfc3339()}"
        rec.mounts.clear()
        return True

    def _volume(self, rec: VolumeRecord, with_status: bool) -> Volume:
        drv = driver_for(rec.type)
        vdir = self.store.volume_dir(rec.name)
        vol = Volume(rec.name, rec.type, drv.mountpoint(rec, vdir), rec.created_at, rec.options, rec.labels)
        if with_status:
            vol.status = {
                "Type": rec.type,
                "Mounted": drv.is_provisioned(rec, vdir) if drv.mounts_on_use(rec) else rec.refs > 0,
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
                self._forget_stale(rec)
                out.append(self._volume(rec, with_status))
        return out

    def path(self, name: str) -> Path:
        rec = self._load(name)
        return driver_for(rec.type).mountpoint(rec, self.store.volume_dir(name))

    def _layers_of(self, name: str) -> list[Path]:
        rec = self._load(name)
        # Layers are real paths (Driver.layers); the state root may be reached through a symlink.
        vdir = Path(os.path.realpath(self.store.volume_dir(name)))
        return driver_for(rec.type).layers(rec, vdir, self.ctx)

    def _dependents(self, name: str) -> list[str]:
        return [
            r.name for r in (self.store.load(n) for n in self.store.names())
            if r is not None and driver_for(r.type).depends_on(r) == name
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
            if not self.store.exists(name):
                raise NoSuchVolume(name)
            with self.store.lock_volume(name):
                rec = self._load(name)
                yield rec, driver_for(rec.type), self.store.volume_dir(name)

    def mount(self, name: str, mount_id: str) -> Path:
        """Take a reference for mount_id; the first reference provisions the volume."""
        check_mount_id(mount_id)
        with self._locked(name) as (rec, drv, vdir):
            drv.provision(rec, vdir, self.ctx)
            rec.mounts[mount_id] = rec.mounts.get(mount_id, 0) + 1
            rec.boot = self.boot
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

    def _remove_locked(self, rec: VolumeRecord, force: bool = False) -> None:
        if rec.refs and not force:
            raise StrataError(
                f"volume {rec.name} is in use ({rec.refs} mount reference(s)); "
                "if nothing really uses it, `strata volume rm --force` drops them"
            )
        deps = self._dependents(rec.name)
        if deps:
            raise StrataError(f"volume {rec.name} is cloned by {', '.join(deps)}; remove those first")
        driver_for(rec.type).release(rec, self.store.volume_dir(rec.name))
        self.store.discard(rec.name)

    def remove(self, name: str, force: bool = False) -> None:
        """Remove an unused volume and its data; refused while cloned from, and while mounted
        unless force (the administrator's way out of references a crashed client never released)."""
        with self.store.lock_all(exclusive=True):
            self._remove_locked(self._load(name), force)

    def prune(self) -> list[tuple[str, int]]:
        """Remove every volume without mount references (dependents before what they are
        built on); returns (name, bytes freed) for each."""
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
                    size = driver_for(rec.type).reclaimable(rec, self.store.volume_dir(name))
                    self._remove_locked(rec)
                    removed.append((name, size))
                    progress = True
        return removed

    def recover(self) -> list[str]:
        """Bring the kernel in line with the records after a crash or reboot: drop references
        from an earlier boot, remount referenced volumes that mount on use whose mount
        vanished or died, release mounts nobody references, delete half-done
        creates/removes. Returns what it did, one line each."""
        with self.store.lock_all(exclusive=True):
            report = self.store.sweep()
            for name in self.store.names():
                rec = self.store.load(name)
                if rec is None:
                    continue
                if self._forget_stale(rec):
                    self.store.save(rec)
                    report.append(f"volume {name}: {rec.note}")
                drv, vdir = driver_for(rec.type), self.store.volume_dir(name)
                if not drv.mounts_on_use(rec):
                    continue
                if rec.refs and not drv.is_provisioned(rec, vdir):
                    try:
                        drv.provision(rec, vdir, self.ctx)
                        lost = ("" if drv.keeps_data_unmounted(rec)
                                else f" (a {rec.type}: its previous content was lost)")
                        rec.note = f"mounted again on recovery at {now_rfc3339()}{lost}"
                    except StrataError as e:
                        rec.note = f"could not be mounted again on recovery: {e}"
                    self.store.save(rec)
                    report.append(f"volume {name}: {rec.note}")
                elif not rec.refs and kernel.is_mountpoint(drv.mountpoint(rec, vdir)):
                    drv.release(rec, vdir)
                    report.append(f"volume {name}: released a mount no ID references")
        return report
