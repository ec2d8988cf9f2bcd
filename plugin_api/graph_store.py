"""The layer store behind the GraphDriver protocol: Docker Engine's layers as
strata-unionfs mounts.

Layout under the store root (0700, root's only):

    layers/ID/layer.json   {"parent": ID or "", "created": RFC 3339, "refs": n, "boot": boot id}
    layers/ID/diff/        the layer's own tree in the overlay format (whiteouts 0/0, opaque xattr)
    layers/ID/work/        strata-unionfs's workdir for the layer as an upper
    layers/ID/merged/      where Get mounts the union (layers with a parent)
    tmp/                   Diff's tars on their way out

Layer ids come from dockerd (random 64-hex cache ids and `<id>-init` for a container's
init layer) and are treated as hostile: every id is checked against that form before it
names anything on disk. A layer appears by renaming a fully built `.new-ID` directory into
place and disappears by renaming it to `.trash-ID` first; a diff goes in by extracting into
a fresh directory beside the empty `diff` and exchanging the two (renameat2), so a kill -9
at any moment leaves the old state or the new one, and `recover` sweeps the rest.

Get/Put references are counted per layer in layer.json with the boot id, so they survive a
restart (or kill -9) of the service (the strata-unionfs daemons outlive it) and are dropped
by a reboot, which unmounts everything. A layer without a parent is served as its plain
`diff` directory: there is nothing below it for a union to merge. The service is the store's
only user (an exclusive flock on the root); threads of one service are ordered per layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from common import dirwalk, kernel
from common.atomic import fsync_dir, write_atomic
from common.errors import StrataError
from common.paths import private_dir
from common.tree import remove_path
from images.archive import apply_layer
from images.changes import changes
from images.produce import produce_layer
from unionfs import client

log = logging.getLogger("strata.graph")

LAYER_ID = re.compile(r"[0-9a-f]{64}(-init)?\Z")
RECORD = "layer.json"
DIFF, WORK, MERGED, APPLIED = "diff", "work", "merged", "applied"
_NEW, _TRASH = ".new-", ".trash-"


def check_id(value: object, what: str = "layer id") -> str:
    """A layer id as dockerd makes them: 64 lowercase hex digits, optionally `-init`."""
    if not isinstance(value, str) or not LAYER_ID.match(value):
        shown = repr(value)[:80]
        raise StrataError(f"invalid {what} {shown}: expected 64 hex digits, optionally followed by -init")
    return value


def check_parent(value: object) -> str:
    """"" (no parent) or a layer id."""
    return "" if value in ("", None) else check_id(value, "parent layer id")


@dataclass
class LayerRecord:
    parent: str
    created: str
    refs: int = 0
    boot: str = ""

    @classmethod
    def load(cls, path: Path) -> LayerRecord:
        data = json.loads(path.read_bytes())
        return cls(parent=check_parent(data["parent"]), created=str(data["created"]),
                   refs=int(data["refs"]), boot=str(data["boot"]))


class GraphStore:
    """Docker's layers: create, remove, mount (Get/Put), and diffs in and out."""

    def __init__(self, root: Path, unionfs: str | None = None) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.tmp_dir = root / "tmp"
        self.unionfs = unionfs
        self._records: dict[str, LayerRecord] = {}
        self._guard = threading.Lock()  # the records dict and the per-layer lock table
        self._locks: dict[str, threading.Lock] = {}
        self._lock_fd: int | None = None

    # --- start-up ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def open(self) -> list[str]:
        """Take the store (one service at a time: other `strata serve`s on the same state
        root, e.g. under another plugin name, serve volumes only), load the records and
        repair what a crash left: half-made or half-removed layers, half-applied diffs,
        mounts without references and referenced layers whose mount died. One line per
        repair. Opening an open store does nothing."""
        if self.is_open:
            return []
        for d in (self.root, self.layers_dir, self.tmp_dir):
            private_dir(d)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StrataError(f"another strata serve uses the layer store {self.root}") from None
        try:
            notes = self._recover()
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        return notes

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> list[str]:
        notes: list[str] = []
        for entry in sorted(os.listdir(self.tmp_dir)):
            remove_path(self.tmp_dir / entry)
        boot = kernel.boot_id()
        for name in sorted(os.listdir(self.layers_dir)):
            ldir = self.layers_dir / name
            if name.startswith((_NEW, _TRASH)):
                self._unmount(ldir / MERGED)
                remove_path(ldir)
                notes.append(f"removed the leftover {name} of an interrupted create or remove")
                continue
            if not LAYER_ID.match(name):
                notes.append(f"ignored {ldir}: not a layer id")
                continue
            try:
                rec = LayerRecord.load(ldir / RECORD)
            except (OSError, ValueError, KeyError, TypeError, StrataError) as e:
                notes.append(f"ignored layer {name}: unreadable {RECORD} ({e})")
                continue
            for leftover in os.listdir(ldir):
                if leftover == APPLIED or leftover.startswith(f".{APPLIED}."):
                    remove_path(ldir / leftover)  # a diff that was being applied: the layer stays empty
                    notes.append(f"layer {name}: removed a half-applied diff")
            if rec.boot != boot and rec.refs:
                notes.append(f"layer {name}: dropped {rec.refs} reference(s) from an earlier boot")
                rec.refs, rec.boot = 0, boot
                self._write(name, rec)
            self._records[name] = rec
        for name, rec in self._records.items():
            merged = self.layers_dir / name / MERGED
            if rec.parent and rec.refs and not client.alive(merged):
                self._unmount(merged)
                try:
                    self._mount(name)
                    notes.append(f"layer {name}: mounted again ({rec.refs} reference(s), its mount was gone)")
                except StrataError as e:
                    notes.append(f"layer {name}: cannot mount again: {e}")
            elif not rec.refs and kernel.is_mountpoint(merged):
                self._unmount(merged)
                notes.append(f"layer {name}: unmounted (no references)")
        return notes

    # --- records and locks ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *layer_ids: str) -> Iterator[None]:
        """The layers' locks, taken in id order (so two callers never wait on each other)."""
        with self._guard:
            locks = [self._locks.setdefault(i, threading.Lock()) for i in sorted(set(layer_ids)) if i]
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _record(self, layer_id: str) -> LayerRecord:
        with self._guard:
            rec = self._records.get(layer_id)
        if rec is None:
            raise StrataError(f"layer {layer_id} does not exist")
        return rec

    def _write(self, layer_id: str, rec: LayerRecord, ldir: Path | None = None) -> None:
        write_atomic((ldir or self.layers_dir / layer_id) / RECORD, json.dumps(asdict(rec)).encode())

    def exists(self, layer_id: str) -> bool:
        check_id(layer_id)
        with self._guard:
            return layer_id in self._records

    def lowers(self, layer_id: str) -> list[Path]:
        """The diff dirs below a layer, top first: its parent's, the parent's parent's..."""
        out: list[Path] = []
        parent = self._record(layer_id).parent
        while parent:
            out.append(self.layers_dir / parent / DIFF)
            parent = self._record(parent).parent
        return out

    def _check_parent_of(self, layer_id: str, parent: str) -> LayerRecord:
        rec = self._record(layer_id)
        if parent != rec.parent:
            raise StrataError(f"layer {layer_id} has parent {rec.parent or 'none'}, not {parent or 'none'}")
        return rec

    # --- create and remove ---------------------------------------------------------------

    def create(self, layer_id: str, parent: str) -> None:
        """An empty layer over parent ("" for a base layer)."""
        check_id(layer_id)
        check_parent(parent)
        with self._locked(layer_id, parent):  # the parent's too: not removed meanwhile
            if self.exists(layer_id):
                raise StrataError(f"layer {layer_id} already exists")
            if parent:
                self._record(parent)  # must exist
            new = self.layers_dir / f"{_NEW}{layer_id}"
            remove_path(new)
            private_dir(new)
            os.mkdir(new / DIFF, 0o755)  # the root directory of what is built on it
            os.mkdir(new / WORK, 0o700)
            if parent:
                os.mkdir(new / MERGED, 0o700)
            rec = LayerRecord(parent=parent, created=_now(), boot=kernel.boot_id())
            self._write(layer_id, rec, new)
            os.rename(new, self.layers_dir / layer_id)
            fsync_dir(self.layers_dir)
            with self._guard:
                self._records[layer_id] = rec

    def remove(self, layer_id: str) -> None:
        """Remove a layer no other layer stands on; one still mounted (a Put Docker never
        sent) is unmounted first, since Docker removing it means nothing uses it."""
        check_id(layer_id)
        with self._locked(layer_id):
            self._record(layer_id)
            with self._guard:
                children = [i for i, r in self._records.items() if r.parent == layer_id]
            if children:
                raise StrataError(f"layer {layer_id} has {len(children)} layer(s) on top; remove those first")
            ldir = self.layers_dir / layer_id
            self._unmount(ldir / MERGED)
            trash = self.layers_dir / f"{_TRASH}{layer_id}"
            os.rename(ldir, trash)
            fsync_dir(self.layers_dir)
            with self._guard:
                del self._records[layer_id]
            try:
                remove_path(trash)
            except OSError as e:  # gone from Docker's view already; swept at the next start
                log.warning("layer %s: cannot remove %s yet: %s", layer_id, trash, e.strerror or e)

    # --- mounts --------------------------------------------------------------------------

    def _mount(self, layer_id: str) -> None:
        ldir = self.layers_dir / layer_id
        union = client.Union(self.lowers(layer_id), ldir / DIFF, ldir / WORK)
        client.mount(union, ldir / MERGED, prog=self.unionfs)

    def _unmount(self, target: Path) -> None:
        with contextlib.suppress(StrataError):
            client.unmount(target)

    def get(self, layer_id: str) -> Path:
        """Take a reference and return the layer's root: the union of it over its parents
        (mounted by the first reference, or again if its daemon died), or the plain diff
        directory of a base layer."""
        check_id(layer_id)
        with self._locked(layer_id):
            rec = self._record(layer_id)
            ldir = self.layers_dir / layer_id
            if rec.parent and not client.alive(ldir / MERGED):
                self._unmount(ldir / MERGED)
                self._mount(layer_id)
            rec.refs += 1
            rec.boot = kernel.boot_id()
            self._write(layer_id, rec)
            return ldir / (MERGED if rec.parent else DIFF)

    def put(self, layer_id: str) -> None:
        """Drop a reference; the last one unmounts. A Put without a reference is fine (Docker
        sends one for a container it finds stopped after its own crash)."""
        check_id(layer_id)
        with self._locked(layer_id):
            rec = self._record(layer_id)
            rec.refs = max(rec.refs - 1, 0)
            if rec.refs == 0 and rec.parent:
                client.unmount(self.layers_dir / layer_id / MERGED)
            self._write(layer_id, rec)

    def refs(self, layer_id: str) -> int:
        return self._record(check_id(layer_id)).refs

    # --- diffs ---------------------------------------------------------------------------

    def apply_diff(self, layer_id: str, parent: str, source: BinaryIO) -> int:
        """Extract a layer tar (plain, gzip or zstd; hostile entries refused, nothing left
        behind) into the empty layer Create made; return the size of its files."""
        check_id(layer_id)
        check_parent(parent)
        with self._locked(layer_id):
            rec = self._check_parent_of(layer_id, parent)
            ldir = self.layers_dir / layer_id
            if rec.refs:
                raise StrataError(f"layer {layer_id} is mounted; a diff goes only into a new layer")
            if os.listdir(ldir / DIFF):
                raise StrataError(f"layer {layer_id} is not empty; a diff goes only into a new layer")
            remove_path(ldir / APPLIED)
            st = os.statvfs(self.root)
            applied = apply_layer(source, ldir / APPLIED, max_size=st.f_bavail * st.f_frsize)
            fd = os.open(ldir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                kernel.renameat2(fd, APPLIED, fd, DIFF, kernel.RENAME_EXCHANGE)
                os.fsync(fd)
            finally:
                os.close(fd)
            remove_path(ldir / APPLIED)  # the empty directory it replaced
            return applied.size

    def diff(self, layer_id: str, parent: str, out: BinaryIO) -> str:
        """Write the layer's changes over its parent as an OCI layer tar; return its DiffID."""
        check_id(layer_id)
        check_parent(parent)
        self._check_parent_of(layer_id, parent)
        return produce_layer(self.layers_dir / layer_id / DIFF, out, self.lowers(layer_id))

    def changes(self, layer_id: str, parent: str) -> list[tuple[str, str]]:
        """(A|C|D, "/path") for every entry of the layer's diff over its parents."""
        check_id(layer_id)
        check_parent(parent)
        self._check_parent_of(layer_id, parent)
        try:
            return changes(self.layers_dir / layer_id / DIFF, self.lowers(layer_id))
        except OSError as e:
            raise StrataError(f"cannot read the changes of layer {layer_id}: {e.strerror or e}") from None

    def diff_size(self, layer_id: str, parent: str) -> int:
        """Bytes of the regular files in the layer's own tree (a hard-linked file once)."""
        check_id(layer_id)
        check_parent(parent)
        self._check_parent_of(layer_id, parent)
        seen: set[int] = set()
        total = 0
        top = os.open(self.layers_dir / layer_id / DIFF, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for _, entry in dirwalk.walk(top):
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_size
        except OSError as e:
            raise StrataError(f"cannot measure layer {layer_id}: {e.strerror or e}") from None
        finally:
            os.close(top)
        return total

    # --- information ---------------------------------------------------------------------

    def metadata(self, layer_id: str) -> dict[str, str]:
        """What `docker inspect` shows as GraphDriver.Data, in overlay2's keys."""
        check_id(layer_id)
        rec = self._record(layer_id)
        ldir = self.layers_dir / layer_id
        out = {"UpperDir": str(ldir / DIFF), "WorkDir": str(ldir / WORK)}
        if rec.parent:
            out["MergedDir"] = str(ldir / MERGED)
            out["LowerDir"] = ":".join(str(p) for p in self.lowers(layer_id))
        return out

    def status(self) -> list[tuple[str, str]]:
        """`docker info`'s Storage Driver lines."""
        with self._guard:
            recs = list(self._records.values())
        return [
            ("Root Dir", str(self.root)),
            ("Backing Filesystem", _fstype_of(self.root)),
            ("Layers", str(len(recs))),
            ("Layers In Use", str(sum(1 for r in recs if r.refs))),
            ("Union", client.PROG),
        ]

    def tmp_file(self) -> BinaryIO:
        """An anonymous file in the store (root's, on its filesystem) for a tar on its way out."""
        fd = os.open(self.tmp_dir, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "w+b")


def _fstype_of(path: Path) -> str:
    """The type of the file system holding path: the deepest mount at or above it."""
    where = os.path.realpath(path)
    best, fstype = "", "unknown"
    for _, target, kind, _ in kernel.mounts():
        inside = where == target or where.startswith(target.rstrip("/") + "/")
        if inside and len(target) >= len(best):
            best, fstype = target, kind
    return fstype


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
