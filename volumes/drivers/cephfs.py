"""Shared volumes on CephFS: one volume list for every host of a cluster, served to
Docker with Scope "global" (strata serve's second plugin, `strata-shared`).

What lives where:

    in CephFS, below the configured root (the cluster's truth, seen by every host)
        volumes/NAME/volume.json   the record (options, labels, creation), written temp + rename
        volumes/NAME/data/         the volume's content; size= is its ceph.quota.max_bytes
        volumes/NAME/users/HOST    one marker per host that has it mounted
        volumes/NAME/removing      a Remove in flight (mkdir: the arbiter between hosts)
        .new-HOST-*/ .trash-HOST-*/  a Create or Remove of HOST in flight

    in the host's state root (<state root>/shared-volumes, root only; dot names are never
    volume names)
        .host                 this host's id in the cluster (made once)
        .cluster/             a ceph-fuse mount of the root: how records are read and written
        .cluster.tag          the client-metadata tag of that mount
        .lock, .locks/NAME    flocks: recovery takes .lock alone, a call on NAME shares it
        NAME/host.json        this host's mount references (mount ID -> count), boot, mount tag
        NAME/volume.json      this host's last copy of the record: Get's answer while the
                              cluster cannot be reached
        NAME/_data            the volume's own ceph-fuse mount (-r ROOT/volumes/NAME/data),
                              made at its first Mount on this host and ended after the last

Two hosts never lose or duplicate a volume: a volume appears by renaming a fully
built `.new-` directory to its name and vanishes by renaming it to `.trash-` first,
so a volume's directory is never empty, and rename(2) onto a non-empty directory
fails (ENOTEMPTY): the MDS lets exactly one Create win, the loser compares options
as a second Create on one host does (ceph-fuse refuses RENAME_NOREPLACE: EINVAL).
Remove and a host's first Mount each write their flag (`removing`, `users/HOST`)
and then look for the other's, so at least one of them sees the other and backs
off: a volume is never removed while any host has it mounted.

Every method runs through `cephfuse.bounded`: when the cluster does not answer,
the call ends with a one-line error after the configured timeout instead of
hanging Docker, and a ceph-fuse killed under a mounted volume (ENOTCONN) is
detached, its session evicted and mounted afresh before Mount answers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common import kernel
from common.atomic import write_atomic
from common.errors import StrataError
from common.paths import STATE_ROOT_MODE, private_dir
from common.tree import remove_path

from .. import cephfuse
from ..config import CephConfig, VolumeConfig
from ..manager import NoSuchVolume, Volume
from ..names import check_mount_id, check_name
from ..options import check_options, check_size, owner_and_mode
from ..state import current_boot, flock, now_rfc3339
from .base import DATA, refuse_unknown

T = TypeVar("T")
TYPE = "cephfs"
ACCEPTED = frozenset({"size", "uid", "gid", "mode"})
RECORD = "volume.json"
HOST_RECORD = "host.json"
QUOTA = "ceph.quota.max_bytes"
RBYTES = "ceph.dir.rbytes"
# A whole call may wait on the cluster several times (control mount, eviction, mount):
# each of those has the configured timeout; this bounds the sum.
_CALL_FACTOR = 3


@dataclass
class HostRefs:
    """What this host keeps about one shared volume: its mount references."""

    mounts: dict[str, int] = field(default_factory=dict)
    boot: str = ""
    tag: str | None = None  # the client-metadata tag of the volume's ceph-fuse mount
    note: str = ""

    @property
    def refs(self) -> int:
        return sum(self.mounts.values())


def _host_name() -> str:
    """The machine's name as part of a host id: no dots, which mark a marker's temp file."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64].strip("-") or "host"


class SharedVolumes:
    """The VolumeDriver (`plugin_api.protocol`) of the shared backend: `strata serve`
    hands it to its second plugin."""

    scope = "global"

    def __init__(self, root: Path, config: VolumeConfig) -> None:
        if config.cephfs is None:
            raise StrataError("no cephfs section in the volume config: shared volumes are off")
        self.cfg: CephConfig = config.cephfs
        self.max_size = config.max_size
        self.root = private_dir(root, STATE_ROOT_MODE)
        self.control = self.root / ".cluster"
        self.boot = current_boot()
        self.host = self._host_id()

    def _host_id(self) -> str:
        """This host's name in the cluster, made once: the machine's name plus a random
        part, so two state roots on one machine are two hosts."""
        path = self.root / ".host"
        with contextlib.suppress(FileNotFoundError):
            return check_name(path.read_text().strip())
        mine = self.root / f".host.{os.getpid()}"
        write_atomic(mine, f"{_host_name()}-{os.urandom(4).hex()}\n".encode())
        with contextlib.suppress(FileExistsError):  # another process made one first: keep theirs
            os.link(mine, path)
        os.unlink(mine)
        return check_name(path.read_text().strip())

    # -- bounded calls ------------------------------------------------------------------

    def _bounded(self, fn: Callable[[], T], what: str, ticket: cephfuse.Ticket | None = None) -> T:
        """fn within the call's time bound; a failed file operation in the cluster (another
        host changed what this call was looking at) is a one-line error, not a crash."""
        try:
            return cephfuse.bounded(fn, self.cfg.timeout * _CALL_FACTOR + 5, what, ticket)
        except OSError as e:
            raise StrataError(f"{what}: {e.strerror or e}") from None

    # -- this host's state --------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, name: str | None = None) -> Iterator[None]:
        """Orders Mount, Unmount and Remove of one volume on this host (name), or everything
        (None: recovery). Volumes lock apart, so first Mounts of different volumes start
        their ceph-fuse side by side; the lock files stay (`.locks/NAME`), so no holder
        ever locks a file another has just deleted."""
        with flock(self.root / ".lock", name is None):
            if name is None:
                yield
                return
            locks = private_dir(self.root / ".locks", STATE_ROOT_MODE)
            with flock(locks / check_name(name), True):
                yield

    def _local(self, name: str) -> Path:
        return self.root / check_name(name)

    def mountpoint(self, name: str) -> Path:
        return self._local(name) / DATA

    def _load_refs(self, name: str) -> HostRefs:
        try:
            raw = json.loads((self._local(name) / HOST_RECORD).read_bytes())
        except FileNotFoundError:
            return HostRefs()
        except (OSError, ValueError) as e:
            raise StrataError(f"shared volume {name}: unreadable host state: {e}") from None
        return HostRefs({str(k): int(v) for k, v in raw.get("Mounts", {}).items()}, raw.get("Boot", ""),
                        raw.get("Tag"), raw.get("Note", ""))

    def _save_refs(self, name: str, refs: HostRefs) -> None:
        private_dir(self._local(name), STATE_ROOT_MODE)
        body = {"Mounts": refs.mounts, "Boot": refs.boot, "Tag": refs.tag, "Note": refs.note}
        write_atomic(self._local(name) / HOST_RECORD, json.dumps(body, sort_keys=True).encode() + b"\n")

    def _forget_stale(self, refs: HostRefs) -> bool:
        """References from an earlier boot: their containers are gone (see VolumeManager)."""
        if not refs.mounts or refs.boot == self.boot:
            return False
        refs.note = f"{refs.refs} mount reference(s) from before a reboot dropped at {now_rfc3339()}"
        refs.mounts.clear()
        return True

    # -- the cluster --------------------------------------------------------------------

    def _cluster(self) -> Path:
        """The root of the shared volumes through this host's control mount, mounted (or
        replaced, when its ceph-fuse died) first if need be."""
        tag_file = self.root / ".cluster.tag"
        with flock(self.root / ".cluster.lock", True):
            try:
                tag: str | None = tag_file.read_text().strip()
            except FileNotFoundError:
                tag = None
            cephfuse.ensure(self.cfg, self.cfg.root, self.control, tag,
                            lambda t: write_atomic(tag_file, t.encode()))
        top = self.control / "volumes"
        top.mkdir(mode=0o755, exist_ok=True)
        return top

    def _vdir(self, name: str) -> Path:
        return self._cluster() / check_name(name)

    def _record(self, vdir: Path) -> dict[str, Any] | None:
        try:
            raw = json.loads((vdir / RECORD).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StrataError(f"shared volume {vdir.name}: unreadable record: {e}") from None
        if not isinstance(raw, dict):
            raise StrataError(f"shared volume {vdir.name}: unreadable record")
        return raw

    def _existing(self, name: str) -> tuple[Path, dict[str, Any]]:
        vdir = self._vdir(name)
        rec = self._record(vdir)
        if rec is None:
            raise NoSuchVolume(name)
        return vdir, rec

    def _users(self, vdir: Path) -> list[str]:
        """The hosts that have the volume mounted (a marker being written counts too)."""
        try:
            return sorted(n.lstrip(".").split(".")[0] for n in os.listdir(vdir / "users"))
        except FileNotFoundError:
            return []

    def _fs_path(self, name: str) -> str:
        return f"{self.cfg.root.rstrip('/')}/volumes/{name}/data"

    # -- reading ------------------------------------------------------------------------

    def _volume(self, name: str, rec: dict[str, Any], vdir: Path | None) -> Volume:
        vol = Volume(name, TYPE, self.mountpoint(name), str(rec.get("CreatedAt", "")),
                     dict(rec.get("Options") or {}), dict(rec.get("Labels") or {}))
        if vdir is not None:
            refs = self._load_refs(name)
            self._forget_stale(refs)
            limit = rec.get("Options", {}).get("size")
            vol.status = {
                "Type": TYPE, "Mounted": refs.refs > 0, "MountCount": refs.refs, "MountIDs": len(refs.mounts),
                "Host": self.host, "MountedOn": self._users(vdir), "Size": _rbytes(vdir / "data"),
                "SizeLimit": int(limit) if limit else None,
            }
            if refs.note:
                vol.status["Note"] = refs.note
        return vol

    def get(self, name: str) -> Volume:
        """The volume from the cluster; when the cluster cannot be reached, from this host's
        last copy of its record (Docker takes a failing Get for an unknown volume and would
        make a local one of the same name on the next `run -v`)."""
        check_name(name)

        def go() -> Volume:
            vdir, rec = self._existing(name)
            self._remember(name, rec)
            return self._volume(name, rec, vdir)
        try:
            return self._bounded(go, f"get {name}")
        except NoSuchVolume:
            raise
        except StrataError as e:
            rec = self._remembered(name)
            if rec is None:
                raise
            vol = self._volume(name, rec, None)
            refs = self._load_refs(name)
            vol.status = {"Type": TYPE, "Mounted": refs.refs > 0, "MountCount": refs.refs,
                          "MountIDs": len(refs.mounts), "Host": self.host,
                          "Note": f"this host's last copy of the record: {e}"}
            return vol

    def _remember(self, name: str, rec: dict[str, Any]) -> None:
        """Keep this host's copy of a record it has seen (written only when it changed)."""
        path = self._local(name) / RECORD
        body = json.dumps(rec, sort_keys=True).encode() + b"\n"
        with contextlib.suppress(OSError):
            if path.read_bytes() == body:
                return
        private_dir(self._local(name), STATE_ROOT_MODE)
        write_atomic(path, body)

    def _remembered(self, name: str) -> dict[str, Any] | None:
        try:
            raw = json.loads((self._local(name) / RECORD).read_bytes())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def path(self, name: str) -> Path:
        def go() -> Path:
            self._existing(name)
            return self.mountpoint(name)
        return self._bounded(go, f"path {name}")

    def list_volumes(self) -> list[Volume]:
        def go() -> list[Volume]:
            top = self._cluster()
            out = []
            for n in sorted(os.listdir(top)):
                with contextlib.suppress(StrataError):
                    rec = self._record(top / check_name(n))
                    if rec is not None:  # None: removed while we listed
                        out.append(self._volume(n, rec, None))
            return out
        return self._bounded(go, "list")

    # -- create and remove --------------------------------------------------------------

    def create(self, name: str, opts: object = None) -> Volume:
        """Create the volume in the cluster; one that exists with the same options is a
        no-op, whichever host made it."""
        check_name(name)
        clean = check_options(opts)
        if clean.pop("type", TYPE) != TYPE:
            raise StrataError(f"the shared driver makes type={TYPE} volumes only")
        refuse_unknown(TYPE, clean, ACCEPTED)
        uid, gid, mode = owner_and_mode(clean, 0o755)
        return self._bounded(lambda: self._create(name, clean, uid, gid, mode), f"create {name}")

    def _create(self, name: str, opts: dict[str, str], uid: int, gid: int, mode: int) -> Volume:
        top = self._cluster()
        if "size" in opts:
            fs = os.statvfs(top)
            opts["size"] = str(check_size(opts["size"], fs.f_bavail * fs.f_frsize,
                                          "the free space of the Ceph cluster", self.max_size))
        rec = {"Version": 1, "Name": name, "Type": TYPE, "Options": opts, "Labels": {},
               "CreatedAt": now_rfc3339(), "CreatedBy": self.host}
        existing = self._record(top / name)
        if existing is None:
            staging = Path(tempfile.mkdtemp(prefix=f".new-{self.host}-", dir=self.control))
            try:
                data = staging / "data"
                data.mkdir()
                (staging / "users").mkdir()
                os.chown(data, uid, gid)
                os.chmod(data, mode)
                if "size" in opts:
                    os.setxattr(data, QUOTA, opts["size"].encode())
                write_atomic(staging / RECORD, json.dumps(rec, indent=1, sort_keys=True).encode() + b"\n",
                             0o644)
                # rename(2) never replaces a non-empty directory, and a volume's never is empty
                os.rename(staging, top / name)
                self._remember(name, rec)
                return self._volume(name, rec, None)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StrataError(f"cannot create shared volume {name}: {e.strerror or e}") from None
            finally:
                with contextlib.suppress(OSError):
                    remove_path(staging)
            existing = self._record(top / name)  # another host created it first
            if existing is None:
                raise StrataError(f"shared volume {name} was created and removed meanwhile; try again")
        if existing.get("Options") != opts:
            raise StrataError(f"volume {name} already exists with different options")
        return self._volume(name, existing, None)

    def remove(self, name: str) -> None:
        """Remove the volume and its data from the cluster; refused while any host has it
        mounted."""
        check_name(name)
        self._bounded(lambda: self._remove(name), f"remove {name}")

    def _remove(self, name: str) -> None:
        with self._lock(name):
            refs = self._load_refs(name)
            self._forget_stale(refs)
            if refs.refs:
                raise StrataError(f"volume {name} is in use on this host ({refs.refs} mount reference(s))")
            vdir, _ = self._existing(name)
            flag = vdir / "removing"
            try:
                flag.mkdir()
            except FileExistsError:  # another Remove runs: both check, one renames
                pass
            except FileNotFoundError:  # ... and already did
                raise NoSuchVolume(name) from None
            users = self._users(vdir)
            if users:
                with contextlib.suppress(OSError):
                    flag.rmdir()
                raise StrataError(f"volume {name} is in use on host(s) {', '.join(users)}")
            trash = self.control / f".trash-{self.host}-{os.urandom(6).hex()}"
            try:
                os.rename(vdir, trash)
            except FileNotFoundError:
                raise NoSuchVolume(name) from None
            with contextlib.suppress(OSError):
                remove_path(trash)
            self._forget_local(name)

    def _forget_local(self, name: str) -> None:
        local = self._local(name)
        if not kernel.is_mountpoint(local / DATA):
            with contextlib.suppress(OSError):
                remove_path(local)

    # -- mount and unmount --------------------------------------------------------------

    def mount(self, name: str, mount_id: str) -> Path:
        """Take a reference for mount_id; the first on this host marks the volume used by
        this host in the cluster. The volume's ceph-fuse is (re)made if absent or dead."""
        check_name(name)
        check_mount_id(mount_id)
        ticket = cephfuse.Ticket()
        return self._bounded(lambda: self._mount(name, mount_id, ticket), f"mount {name}", ticket)

    def _mount(self, name: str, mount_id: str, ticket: cephfuse.Ticket) -> Path:
        with self._lock(name):
            vdir, rec = self._existing(name)
            self._remember(name, rec)
            refs = self._load_refs(name)
            self._forget_stale(refs)
            first = not refs.refs
            if first:
                self._claim(vdir, name)
            try:
                done = self._provision(name, refs)
                if not ticket.commit():  # Docker was told this Mount failed: take no reference
                    raise cephfuse.ClusterTimeout(f"mount {name}: answered too late")
            except BaseException:
                if first:
                    with contextlib.suppress(StrataError, OSError):  # the first failure is the news
                        self._release(name, refs)
                raise
            if done != "mounted" and not first:
                refs.note = f"{done} at {now_rfc3339()}"
            refs.mounts[mount_id] = refs.mounts.get(mount_id, 0) + 1
            refs.boot = self.boot
            self._save_refs(name, refs)
            return self.mountpoint(name)

    def _provision(self, name: str, refs: HostRefs) -> str:
        """The volume's own ceph-fuse mount, live; what had to be done ("" if nothing)."""
        private_dir(self._local(name), STATE_ROOT_MODE)

        def record(tag: str) -> None:
            refs.tag = tag
            self._save_refs(name, refs)

        refs.tag, done = cephfuse.ensure(self.cfg, self._fs_path(name), self.mountpoint(name), refs.tag,
                                         record)
        return done

    def _claim(self, vdir: Path, name: str) -> None:
        """Mark the volume used by this host, then make sure no Remove has begun (Remove
        does the same the other way round)."""
        marker = vdir / "users" / self.host
        try:
            write_atomic(marker, json.dumps({"Host": self.host, "Since": now_rfc3339()}).encode(), 0o644)
        except FileNotFoundError:
            raise NoSuchVolume(name) from None
        if (vdir / "removing").exists():
            self._unclaim(vdir)
            raise StrataError(f"volume {name} is being removed")

    def _unclaim(self, vdir: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vdir / "users" / self.host)

    def unmount(self, name: str, mount_id: str) -> None:
        """Drop a reference of mount_id; the last on this host ends the volume's ceph-fuse
        and this host's marker."""
        check_name(name)
        check_mount_id(mount_id)
        self._bounded(lambda: self._unmount(name, mount_id), f"unmount {name}")

    def _unmount(self, name: str, mount_id: str) -> None:
        with self._lock(name):
            refs = self._load_refs(name)
            if mount_id not in refs.mounts:
                raise StrataError(f"volume {name} is not mounted with ID {mount_id}")
            refs.mounts[mount_id] -= 1
            if not refs.mounts[mount_id]:
                del refs.mounts[mount_id]
            if refs.refs:
                self._save_refs(name, refs)
                return
            refs.note = ""
            self._save_refs(name, refs)  # the reference is gone whatever the cluster does next
            self._release(name, refs)

    def _release(self, name: str, refs: HostRefs) -> None:
        """End the volume's mount and this host's marker (the last reference is gone)."""
        cephfuse.release(self.mountpoint(name), self.cfg.timeout)
        refs.tag = None
        self._save_refs(name, refs)
        self._unclaim(self._vdir(name))

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After a restart (of the service or the host): drop references from an earlier
        boot, remount referenced volumes whose ceph-fuse is gone or dead, release mounts
        and markers nobody here references, delete this host's half-done creates and
        removes. Never fails: an unreachable cluster is reported and the next call retries."""
        try:
            return self._bounded(self._recover, "recovery of shared volumes")
        except StrataError as e:
            return [f"shared volumes not recovered: {e}"]

    def _recover(self) -> list[str]:
        report: list[str] = []
        with self._lock():
            top = self._cluster()
            for entry in os.listdir(self.control):
                if entry.startswith((f".new-{self.host}-", f".trash-{self.host}-")):
                    with contextlib.suppress(OSError):
                        remove_path(self.control / entry)
                        report.append(f"removed leftover {entry} in the cluster")
            for e in os.scandir(self.root):
                if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                    continue
                name = e.name
                refs = self._load_refs(name)
                if self._forget_stale(refs):
                    self._save_refs(name, refs)
                    report.append(f"shared volume {name}: {refs.note}")
                if self._record(top / name) is None and not refs.refs:
                    self._forget_local(name)
                    continue
                if refs.refs:
                    try:
                        done = self._provision(name, refs)
                    except StrataError as err:
                        done = f"could not be mounted again: {err}"
                    if done:
                        refs.note = f"{done} on recovery at {now_rfc3339()}"
                        self._save_refs(name, refs)
                        report.append(f"shared volume {name}: {refs.note}")
                    continue
                now = cephfuse.state(self.mountpoint(name), self.cfg.timeout)
                if now is not cephfuse.State.LIVE:  # dead or gone with the last boot
                    done = cephfuse.retire(self.cfg, self.mountpoint(name), refs.tag, now)
                else:
                    done = "released a mount no ID references"
                self._release(name, refs)
                if done:
                    report.append(f"shared volume {name}: {done}")
        return report


def _rbytes(path: Path) -> int:
    """CephFS's own recursive byte count of a directory (no walk): -1 if unknown."""
    try:
        return int(os.getxattr(path, RBYTES))
    except (OSError, ValueError):
        return -1
