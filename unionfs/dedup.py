"""File-level deduplication across stored layers, and the disk-usage figures it changes.

Layers never change once stored (a container writes its own upper), so identical
files in different layers can share one inode through hard links. A hard link
shares metadata too, so files are grouped by size, mode, owner, mtime and xattrs
first, then by xxh3-128 of their content, and only linked after a byte-for-byte
comparison: a hash collision can cost a missed saving, never a wrong file.
No index is kept: the groups are recomputed from the layers each run, so there
is nothing that a crash or a removed layer could leave stale.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import stat
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from unionfs.store import Store

_CHUNK = 1 << 20


@dataclass(frozen=True)
class DedupResult:
    files_linked: int
    bytes_saved: int


def _files(store: Store) -> Iterator[tuple[str, os.stat_result]]:
    for layer_dir in sorted(store.layers_dir.iterdir()):
        for dirpath, _dirs, names in os.walk(layer_dir / "diff"):
            for name in names:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    yield path, st


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


def _relink(canonical: str, path: str) -> None:
    """Replace path by a hard link to canonical, atomically, keeping the parent's times
    (the directory is part of the layer's tree too)."""
    parent = os.path.dirname(path)
    pst = os.lstat(parent)
    tmp = os.path.join(parent, f".dedup-{os.getpid()}-{os.path.basename(path)}")
    os.link(canonical, tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        os.unlink(tmp)
        raise
    os.utime(parent, ns=(pst.st_atime_ns, pst.st_mtime_ns), follow_symlinks=False)


def deduplicate(store: Store, progress: Callable[[int], None] | None = None) -> DedupResult:
    """Hard-link identical files across all layers; returns what this run linked and saved."""
    linked = saved = 0
    with store.locked():
        # (size, metadata) → inode → its paths; only groups with two inodes or more are hashed.
        groups: dict[tuple[Any, ...], dict[tuple[int, int], list[str]]]
        groups = defaultdict(lambda: defaultdict(list))
        for path, st in _files(store):
            if st.st_size == 0:
                continue
            meta = (st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, _xattrs(path))
            groups[meta][(st.st_dev, st.st_ino)].append(path)
        for meta, inodes in groups.items():
            if len(inodes) < 2:
                continue
            by_hash: dict[str, list[list[str]]] = defaultdict(list)
            for paths in inodes.values():
                by_hash[_content_hash(paths[0])].append(paths)
                if progress:
                    progress(meta[0])
            for candidates in by_hash.values():
                # The inode with most links stays; the others join it once proven identical.
                candidates.sort(key=len, reverse=True)
                canonical = candidates[0][0]
                for paths in candidates[1:]:
                    if not filecmp.cmp(canonical, paths[0], shallow=False):
                        continue
                    for path in paths:
                        try:
                            _relink(canonical, path)
                        except OSError:
                            break  # e.g. EMLINK: the link limit of this inode is reached
                        linked += 1
                    else:
                        saved += meta[0]
    return DedupResult(linked, saved)


def disk_usage(store: Store) -> dict[str, int]:
    """What `strata system df` shows: sizes as the layers see them and as the disk stores them."""
    apparent = 0
    inodes: dict[tuple[int, int], int] = {}
    for _path, st in _files(store):
        apparent += st.st_size
        inodes[(st.st_dev, st.st_ino)] = st.st_size
    blobs = list(store.blobs_dir.iterdir())
    on_disk = sum(inodes.values())
    return {
        "images": len(store.image_ids()),
        "layers": sum(1 for _ in store.layers_dir.iterdir()),
        "layers_size": apparent,
        "layers_on_disk": on_disk,
        "dedup_saved": apparent - on_disk,
        "blobs": len(blobs),
        "blobs_size": sum(p.stat().st_size for p in blobs),
    }

