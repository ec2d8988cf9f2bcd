"""File-level deduplication across stored layers, and the disk-usage figures it changes.

Layers never change once stored (a container writes its own upper), so identical
files in different layers can share their data. Where the filesystem clones
(`ioctl(FICLONE)`: XFS, btrfs) a duplicate becomes a reflink copy: it keeps its own
inode and metadata, nothing changes in any merged view. Elsewhere (ext4) it becomes
a hard link to its twin, which shares metadata too, so there files are grouped by
size, mode, owner, mtime and xattrs first (and a container sees a link count above 1).
Either way files are grouped by xxh3-128 of their content and only shared after a
byte-for-byte comparison: a hash collision can cost a missed saving, never a wrong
file. No index is kept: groups are recomputed from the layers on each run, so
nothing can go stale when layers are removed. The space figures come from the
extents the filesystem reports (FIEMAP), so they count what is really shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import os
import secrets
import stat
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from common.atomic import fsync_dir
from common.dirwalk import O_DIR, walk
from images.store import Store

_CHUNK = 1 << 20
FICLONE = 0x40049409
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQLLLL")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")  # logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_BATCH = 256
_EXTENT_LAST = 0x1
_EXTENT_NOT_PLACED = 0x2 | 0x4 | 0x200 | 0x400  # unknown, delalloc, inline, tail: no own address


@dataclass(frozen=True)
class DedupResult:
    files_linked: int
    bytes_saved: int
    method: str  # "reflink" or "hardlink"


def _files(store: Store) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file of every layer, with its path: layers never change once stored,
    but a layer may be deeper than Python's stack, so the walk does not recurse."""
    for layer_dir in sorted(store.layers_dir.iterdir()):
        diff = str(layer_dir / "diff")
        top = os.open(diff, O_DIR)
        try:
            with contextlib.closing(walk(top)) as entries:
                for where, entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        yield os.path.join(diff, *where.names, entry.name), entry.stat(follow_symlinks=False)
        finally:
            os.close(top)


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    with contextlib.suppress(OSError):
        return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in os.listxattr(path)))
    return ()


def _content_hash(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _extents(path: str, st: os.stat_result) -> list[tuple[Any, int]]:
    """(where, length) of each extent of a file: the physical address, or, for extents not
    placed yet (delayed allocation), a key of their own inode and offset."""
    out: list[tuple[Any, int]] = []
    start = 0
    with open(path, "rb") as f:
        while True:
            buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_BATCH * _FIEMAP_EXTENT.size)
            _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, _FIEMAP_BATCH, 0)
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            flags = 0
            for i in range(mapped):
                logical, physical, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
                )
                where = (st.st_dev, st.st_ino, logical) if flags & _EXTENT_NOT_PLACED else physical
                out.append((where, length))
                start = logical + length
            if mapped == 0 or flags & _EXTENT_LAST:
                return out


def can_reflink(directory: str | os.PathLike[str]) -> bool:
    """Whether files in directory can share extents (one probe clone, removed at once)."""
    a, b = os.path.join(directory, ".reflink-probe-a"), os.path.join(directory, ".reflink-probe-b")
    try:
        with open(a, "wb") as fa:
            fa.write(b"probe")
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fcntl.ioctl(fb.fileno(), FICLONE, fa.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


def _replace(path: str, make: Callable[[str], None]) -> None:
    """Put a new file at path through a temp name beside it (atomic), keeping the parent's
    times: the directory is part of the layer's tree too. The temp name is unique (a
    leftover of a killed run never blocks the next, and it stays short whatever the
    file's name); the new file and the rename are fsynced, as state writes are, so a
    power cut leaves the old file or the shared one."""
    parent = os.path.dirname(path)
    pst = os.lstat(parent)
    tmp = os.path.join(parent, f".dedup-{secrets.token_hex(8)}.tmp")
    try:
        make(tmp)
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.utime(parent, ns=(pst.st_atime_ns, pst.st_mtime_ns), follow_symlinks=False)
    fsync_dir(parent)


def _clone(canonical: str, original: str) -> Callable[[str], None]:
    """A maker of a reflink copy of canonical carrying original's owner, mode, xattrs, times."""
    st = os.lstat(original)
    xattrs = _xattrs(original)

    def make(tmp: str) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with open(canonical, "rb") as src:
                fcntl.ioctl(fd, FICLONE, src.fileno())
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
            for name, value in xattrs:
                os.setxattr(fd, name, value)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)

    return make


def _share(canonical: str, paths: list[str], reflink: bool) -> None:
    """Make the paths of one inode share canonical's data: a clone (whose new inode the
    other paths then link to, keeping a hard-link group whole) or a hard link each."""
    if reflink:
        _replace(paths[0], _clone(canonical, paths[0]))
        canonical = paths[0]
        paths = paths[1:]
    for path in paths:
        _replace(path, lambda tmp: os.link(canonical, tmp))


def deduplicate(store: Store, progress: Callable[[int], None] | None = None) -> DedupResult:
    """Share identical files across all layers; returns what this run shared and saved."""
    shared = saved = 0
    with store.locked():
        reflink = can_reflink(store.tmp_dir)
        # key → inode → its paths; only groups with two inodes or more are hashed.
        groups: dict[tuple[Any, ...], dict[tuple[int, int], list[str]]]
        groups = defaultdict(lambda: defaultdict(list))
        for path, st in _files(store):
            if st.st_size == 0:
                continue
            key: tuple[Any, ...] = (st.st_size,)
            if not reflink:  # a hard link shares the metadata as well
                key += (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, _xattrs(path))
            groups[key][(st.st_dev, st.st_ino)].append(path)
        for key, inodes in groups.items():
            if len(inodes) < 2:
                continue
            by_hash: dict[str, list[list[str]]] = defaultdict(list)
            for paths in inodes.values():
                by_hash[_content_hash(paths[0])].append(paths)
                if progress:
                    progress(key[0])
            for candidates in by_hash.values():
                # The inode with most links stays; the others join it once proven identical.
                candidates.sort(key=len, reverse=True)
                canonical = candidates[0][0]
                mine = _extents(canonical, os.lstat(canonical)) if reflink else []
                for paths in candidates[1:]:
                    if reflink and _extents(paths[0], os.lstat(paths[0])) == mine:
                        continue  # shared by an earlier run
                    if not filecmp.cmp(canonical, paths[0], shallow=False):
                        continue
                    try:
                        _share(canonical, paths, reflink)
                    except OSError:
                        continue  # e.g. EMLINK: this inode's link limit; the files stay as they were
                    shared += len(paths)
                    saved += key[0]
    return DedupResult(shared, saved, "reflink" if reflink else "hardlink")


def disk_usage(store: Store) -> dict[str, int]:
    """What `strata system df` shows. layers_size: the files as the layers show them;
    layers_on_disk: the distinct extents they occupy; dedup_saved: what sharing extents
    (hard links or reflinks) spares, compared with every file holding its own."""
    apparent = allocated = 0
    extents: dict[Any, int] = {}
    for path, st in _files(store):
        apparent += st.st_size
        for where, length in _extents(path, st):
            allocated += length
            extents[where] = length
    blobs = list(store.blobs_dir.iterdir())
    on_disk = sum(extents.values())
    return {
        "images": len(store.image_ids()),
        "layers": sum(1 for _ in store.layers_dir.iterdir()),
        "layers_size": apparent,
        "layers_on_disk": on_disk,
        "dedup_saved": allocated - on_disk,
        "blobs": len(blobs),
        "blobs_size": sum(p.stat().st_size for p in blobs),
    }
