"""containerd's snapshot model on disk: what `strata snapshotter` serves.

A snapshot is *active* (writable, by key), a *view* (read-only, by key) or *committed*
(read-only, by name; a parent of others). Its metadata (key, parent, kind, times, labels,
usage at commit) lives in an SQLite database (`metadata.db`, WAL, synchronous=FULL: a
transaction is on disk when it returns, and a kill -9 or power cut at any moment leaves the
state before it or after it). Its contents are `snapshots/<id>/fs` (the layer in the
overlay on-disk format, so strata-unionfs, the kernel's overlayfs and images.produce read it)
and `snapshots/<id>/work` (the union's scratch directory), as containerd's own overlayfs
snapshotter lays them out. The id is SQLite's (AUTOINCREMENT: never reused), never the key:
keys and labels are arbitrary client strings and no path is ever built from them.

Crash safety without a second journal: a snapshot directory is created inside the
transaction that inserts its row and removed after the transaction that deletes it, so the
only thing a crash can leave is a directory without a row, which `cleanup` (run at start and
whenever containerd asks, after its garbage collection) deletes.

Mounts handed to containerd: an active snapshot over parents is a `fuse3.strata-unionfs`
mount (containerd runs `mount.fuse3`, which runs strata-unionfs with the options), the
parents' `fs` as lowers, its own `fs`/`work` as upper/work; with no parent it is a bind
mount of its `fs`. A view over one parent is a read-only bind of that parent's `fs`; over
more, a read-only union of them.

With `premount`, the store mounts each union itself (strata-unionfs through unionfs.client)
at `snapshots/<id>/merged` when the snapshot is prepared, mounts it again if its daemon died
when containerd asks for the mounts, unmounts it before a commit or a removal, and hands
containerd a bind mount of it. containerd then never runs a mount helper, whose exit status
containerd 1.6's shim can lose to its child reaper (containerd issue #4387).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import dirwalk, kernel
from common.errors import StrataError
from common.paths import private_dir
from common.tree import remove_tree
from unionfs import client
from unionfs.client import Union

from . import filters

log = logging.getLogger("strata.snapshotter")

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd's Kind enum values
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}
UNIONFS_TYPE = "fuse3.strata-unionfs"
MOUNT_SOURCE = "strata"
MERGED = "merged"  # where a premounted union lives, beside fs/ and work/

# Bounds on what a client may store (containerd's own rule: a label's key and value
# together at most 4096 bytes). Keys are containerd's "namespace/id/name" and digests.
MAX_KEY = 4096
MAX_LABEL = 4096
MAX_LABELS = 512
# A parent chain deeper than this is refused: every layer is a lowerdir of one union,
# passed whole on the command line mount.fuse3 builds (64 layers measured in
# benchmarks.snapshotter). Docker caps images at 127 layers.
MAX_DEPTH = 500


class NotFound(StrataError):
    pass


class AlreadyExists(StrataError):
    pass


class FailedPrecondition(StrataError):
    pass


class InvalidArgument(StrataError):
    pass


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str]


@dataclass(frozen=True)
class Info:
    name: str
    parent: str
    kind: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)

    def field(self, path: Sequence[str]) -> str | None:
        """The value of a filter field path (plugin_api.filters), None when absent."""
        head, rest = path[0], path[1:]
        if head == "labels" and rest:
            return self.labels.get(".".join(rest))
        if rest:
            return None
        return {"name": self.name, "parent": self.parent, "kind": KIND_NAMES.get(self.kind, "")}.get(head)


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


@dataclass(frozen=True)
class _Row:
    id: int
    key: str
    parent: int | None
    kind: int
    created: int
    updated: int
    size: int
    inodes: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL UNIQUE,
    parent  INTEGER REFERENCES snapshots(id),
    kind    INTEGER NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    size    INTEGER NOT NULL DEFAULT 0,
    inodes  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS labels (
    snapshot INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (snapshot, name)
) WITHOUT ROWID;
"""
_COLUMNS = "id, key, parent, kind, created, updated, size, inodes"


def check_key(key: str, what: str = "key") -> None:
    if not key:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY:
        raise InvalidArgument(f"snapshot {what} longer than {MAX_KEY} bytes")
    if "\0" in key:
        raise InvalidArgument(f"snapshot {what} holds a NUL character")


def check_labels(labels: Mapping[str, str]) -> None:
    """containerd's label rule (key + value at most 4096 bytes), plus a bound on their number."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"more than {MAX_LABELS} labels on a snapshot")
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass")) > MAX_LABEL:
            raise InvalidArgument(f"label key and value greater than maximum size ({MAX_LABEL} bytes)")
        if "\0" in k or "\0" in v:
            raise InvalidArgument("label holds a NUL character")


def disk_usage(dirfd: int) -> Usage:
    """Blocks and inodes below a directory (hard links counted once), as containerd's
    fs.DiskUsage counts them; walked anchored to fds, never through a symlink, staying
    on one filesystem."""
    seen: set[int] = set()
    size = 0
    for _, entry in dirwalk.walk(dirfd, one_filesystem=True):
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if st.st_ino in seen:
            continue
        seen.add(st.st_ino)
        size += st.st_blocks * 512
    return Usage(size, len(seen))


class SnapshotStore:
    """The snapshots below `root`; safe to call from many threads (one lock orders the
    metadata; directory trees are removed and measured outside it; with premount a second
    one orders mounting and unmounting unions, so concurrent container starts mount one
    union at a time, ~0.06 s each)."""

    def __init__(self, root: str | os.PathLike[str], *, premount: bool = False) -> None:
        self.premount = premount
        # Orders mounting and unmounting premounted unions (taken before _lock, never after):
        # a union is never mounted for a snapshot being committed or removed.
        self._mount_lock = threading.Lock()
        self.root = Path(os.path.realpath(root))
        if any(c in str(self.root) for c in ",\n"):  # mount options are comma-separated lines
            raise StrataError(f"cannot keep snapshots in {self.root}: the path holds ',' or a newline")
        private_dir(self.root)
        self.snapshots = private_dir(self.root / "snapshots")
        self._dirfd = os.open(self.snapshots, dirwalk.O_DIR)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "metadata.db", isolation_level=None, check_same_thread=False)
        os.chmod(self.root / "metadata.db", 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            os.close(self._dirfd)

    # --- reading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, key: str) -> _Row | None:
        r = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _Row(*r) if r else None

    def _row_by_id(self, id_: int) -> _Row:
        r = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (id_,)).fetchone()
        return _Row(*r)

    def _get(self, key: str) -> _Row:
        check_key(key)
        row = self._row(key)
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return row

    def _labels(self, id_: int) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, value FROM labels WHERE snapshot = ?", (id_,)))

    def _set_labels(self, id_: int, labels: Mapping[str, str]) -> None:
        self._db.execute("DELETE FROM labels WHERE snapshot = ?", (id_,))
        self._db.executemany("INSERT INTO labels (snapshot, name, value) VALUES (?, ?, ?)",
                             [(id_, k, v) for k, v in labels.items()])

    def _info(self, row: _Row) -> Info:
        parent = self._row_by_id(row.parent).key if row.parent is not None else ""
        return Info(row.key, parent, row.kind, row.created, row.updated, self._labels(row.id))

    def _chain(self, row: _Row) -> list[int]:
        """The ids of row's parents, nearest first."""
        out: list[int] = []
        p = row.parent
        while p is not None:
            out.append(p)
            p = self._db.execute("SELECT parent FROM snapshots WHERE id = ?", (p,)).fetchone()[0]
        return out

    def _dir(self, id_: int) -> Path:
        return self.snapshots / str(id_)

    def _union(self, row: _Row) -> Union | None:
        """The union a snapshot is seen through; None where a bind of one directory does."""
        if row.kind == COMMITTED:
            return None
        lowers = [self._dir(p) / "fs" for p in self._chain(row)]
        own = self._dir(row.id)
        if row.kind == ACTIVE:
            return Union(lowers, own / "fs", own / "work") if lowers else None
        return Union(lowers) if len(lowers) > 1 else None

    def _mounts(self, row: _Row) -> list[Mount]:
        union = self._union(row)
        mode = "rw" if row.kind == ACTIVE else "ro"
        if union is None:
            lowers = [] if row.kind == ACTIVE else self._chain(row)
            return [Mount("bind", str(self._dir(lowers[0] if lowers else row.id) / "fs"), [mode, "rbind"])]
        if self.premount:
            return [Mount("bind", str(self._dir(row.id) / MERGED), [mode, "rbind"])]
        options = union.options().split(",")
        return [Mount(UNIONFS_TYPE, MOUNT_SOURCE, options if union.upper else ["ro", *options])]

    def _ensure_union(self, id_: int) -> None:
        """Premount: the snapshot's union live at merged/ (mounted again if its daemon died)."""
        with self._mount_lock:
            with self._lock:
                r = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (id_,)).fetchone()
                union = self._union(_Row(*r)) if r else None
            if union is None:
                if r is None:
                    raise NotFound(f"snapshot {id_} was removed meanwhile")
                return
            merged = self._dir(id_) / MERGED
            if client.alive(merged):
                return
            client.unmount(merged)  # a dead daemon's mount, if any
            client.mount(union, merged)

    def _release_union(self, id_: int) -> None:
        """Premount: unmount the snapshot's union (the caller holds _mount_lock)."""
        merged = self._dir(id_) / MERGED
        if kernel.is_mountpoint(merged):
            client.unmount(merged)

    def stat(self, key: str) -> Info:
        with self._lock:
            return self._info(self._get(key))

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            row = self._get(key)
            if row.kind == COMMITTED:
                raise FailedPrecondition(f"snapshot {key} is committed: only active ones and views mount")
            mounts = self._mounts(row)
        if self.premount:
            self._ensure_union(row.id)
        return mounts

    def walk(self, filter_list: Sequence[str] = ()) -> Iterator[Info]:
        """Every snapshot matching any of the filters (containerd's syntax), in id order."""
        try:
            match = filters.matcher(filter_list)
        except filters.FilterError as e:
            raise InvalidArgument(str(e)) from None
        with self._lock:
            rows = [_Row(*r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")]
            keys = {r.id: r.key for r in rows}
            labels: dict[int, dict[str, str]] = {}
            for sid, name, value in self._db.execute("SELECT snapshot, name, value FROM labels"):
                labels.setdefault(sid, {})[name] = value
        for r in rows:
            info = Info(r.key, keys[r.parent] if r.parent is not None else "", r.kind, r.created, r.updated,
                        labels.get(r.id, {}))
            if match(info.field):
                yield info

    def usage(self, key: str) -> Usage:
        with self._lock:
            row = self._get(key)
        if row.kind == COMMITTED:
            return Usage(row.size, row.inodes)
        return self._measure(row.id)

    def _measure(self, id_: int) -> Usage:
        try:
            fd = os.open(f"{id_}/fs", dirwalk.O_DIR, dir_fd=self._dirfd)
        except FileNotFoundError:
            raise NotFound(f"snapshot {id_} was removed meanwhile") from None
        try:
            return disk_usage(fd)
        finally:
            os.close(fd)

    # --- changing ---------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str], *, view: bool = False) -> list[Mount]:
        """A new active snapshot (or view) over the committed `parent` ("" for none)."""
        check_key(key)
        if parent:
            check_key(parent, "parent")
        check_labels(labels)
        kind = VIEW if view else ACTIVE
        with self._transaction() as db:
            if self._row(key) is not None:
                raise AlreadyExists(f"snapshot {key} already exists")
            parent_id = None
            if parent:
                prow = self._row(parent)
                if prow is None:
                    raise NotFound(f"parent snapshot {parent} does not exist")
                if prow.kind != COMMITTED:
                    raise InvalidArgument(f"parent {parent} is not a committed snapshot")
                if len(self._chain(prow)) + 1 >= MAX_DEPTH:
                    raise InvalidArgument(f"parent {parent} is {MAX_DEPTH} snapshots deep already")
                parent_id = prow.id
            now = time.time_ns()
            cur = db.execute(
                "INSERT INTO snapshots (key, parent, kind, created, updated) VALUES (?, ?, ?, ?, ?)",
                (key, parent_id, kind, now, now))
            id_ = cur.lastrowid
            assert id_ is not None
            self._set_labels(id_, labels)
            self._make_dir(id_)
            try:
                mounts = self._mounts(self._row_by_id(id_))
            except BaseException:
                self._remove_dir(id_)
                raise
        if self.premount:
            try:
                self._ensure_union(id_)
            except BaseException:
                with contextlib.suppress(StrataError):
                    self.remove(key)
                raise
        return mounts

    def _make_dir(self, id_: int) -> None:
        name = str(id_)
        with contextlib.suppress(FileNotFoundError):
            remove_tree(self._dirfd, name)  # a leftover of a crash with a lost database
        os.mkdir(name, 0o700, dir_fd=self._dirfd)
        try:
            fd = os.open(name, dirwalk.O_DIR, dir_fd=self._dirfd)
            try:
                os.mkdir("fs", 0o755, dir_fd=fd)
                os.chmod("fs", 0o755, dir_fd=fd)  # whatever the umask: the container's root
                os.mkdir("work", 0o700, dir_fd=fd)
                if self.premount:
                    os.mkdir(MERGED, 0o755, dir_fd=fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(self._dirfd)
        except BaseException:
            self._remove_dir(id_)
            raise

    def _remove_dir(self, id_: int | str) -> None:
        """Remove a snapshot's directory, never while a union is mounted in it (removing
        through a live mount would delete inside the union). Failures are left to cleanup,
        which tries every directory without a row again."""
        merged = self.snapshots / str(id_) / MERGED
        try:
            if kernel.is_mountpoint(merged):
                client.unmount(merged)
                if kernel.is_mountpoint(merged):
                    raise OSError(f"{merged} is still mounted")
            remove_tree(self._dirfd, str(id_))
        except (OSError, StrataError) as e:
            log.warning("could not remove snapshot directory %s: %s", id_, e)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """The active snapshot `key` becomes the committed `name` (same directory), with
        `labels` as its labels (as containerd's own snapshotters do)."""
        check_key(name, "name")
        check_key(key)
        check_labels(labels)
        with self._mount_lock:  # no union is mounted for it again while it is committed
            self._commit(name, key, labels)

    def _commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        with self._lock:
            row = self._get(key)
            if row.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
        if self.premount:
            self._release_union(row.id)
        usage = self._measure(row.id)  # outside the metadata lock: a big layer takes a while
        with self._transaction() as db:
            now_row = self._row(key)
            if now_row is None or now_row.id != row.id or now_row.kind != ACTIVE:
                raise NotFound(f"snapshot {key} was removed or committed meanwhile")
            if self._row(name) is not None:
                raise AlreadyExists(f"snapshot {name} already exists")
            db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, updated = ?, size = ?, inodes = ? WHERE id = ?",
                (name, COMMITTED, time.time_ns(), usage.size, usage.inodes, row.id))
            self._set_labels(row.id, labels)

    def remove(self, key: str) -> None:
        with self._transaction() as db:
            row = self._get(key)
            if db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (row.id,)).fetchone():
                raise FailedPrecondition(f"cannot remove snapshot {key}: other snapshots have it as parent")
            db.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        with self._mount_lock:
            self._remove_dir(row.id)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        """Change labels: all of them without paths or with `labels`, one per `labels.KEY`
        path (set from `labels`, or removed when `labels` lacks it)."""
        with self._transaction() as db:
            row = self._get(name)
            current = self._labels(row.id)
            if not paths:
                paths = ["labels"]
            for path in paths:
                if path == "labels":
                    current = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in labels:
                        current[k] = labels[k]
                    else:
                        current.pop(k, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of a snapshot (only labels)")
            check_labels(current)
            self._set_labels(row.id, current)
            db.execute("UPDATE snapshots SET updated = ? WHERE id = ?", (time.time_ns(), row.id))
            return self._info(self._row_by_id(row.id))

    def cleanup(self) -> list[str]:
        """Delete every snapshot directory without a row (a crash's leftovers, removals
        that failed); returns their names."""
        with self._lock:
            known = {str(i) for (i,) in self._db.execute("SELECT id FROM snapshots")}
            orphans = [n for n in os.listdir(self._dirfd) if n not in known]
        with self._mount_lock:
            for name in orphans:
                self._remove_dir(name)
        return orphans
