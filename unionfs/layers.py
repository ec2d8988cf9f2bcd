"""Lookup through the layer stack, anchored: which layer holds a name, what
merges under a directory, what a merged directory lists.

Layer 0 is the upper (absent on a read-only mount), layers 1..n the lowers,
top first. Every access is relative to a directory fd (a layer root opened
once at mount, or a directory reached from it one component at a time with
O_NOFOLLOW), so a symlink or a rename someone slips into a layer can make an
access fail but never lead it outside the layer. Lower directories are read
once into a `DirIndex`, keyed by the directory's identity (st_dev, st_ino),
and answered from memory afterwards; the upper is asked directly, since this
process is its only writer but also changes it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from common.dirwalk import O_DIR

from .whiteout import has_opaque_xattr, is_marker, is_whiteout, whited_out_name

UPPER = 0

# Kinds of entry in a lower directory.
DIR, OTHER, WHITEOUT = 1, 2, 3

Ident = tuple[int, int]


def ident(st: os.stat_result) -> Ident:
    """A file's identity on the host: what a name must still point to before it is used."""
    return (st.st_dev, st.st_ino)


def at(dirfd: int, name: str) -> str:
    """A path to `name` in the directory `dirfd` holds, for calls Python offers
    no dir_fd for (the xattr calls): the kernel resolves /proc/self/fd/N to that
    very directory, and with follow_symlinks=False `name` itself is not followed."""
    return f"/proc/self/fd/{dirfd}/{name}"


def stale(name: str = "") -> OSError:
    """The error for a name that no longer leads to the file looked up."""
    return OSError(errno.ESTALE, os.strerror(errno.ESTALE), name)


def open_checked(dirfd: int, name: str, flags: int, expect: Ident | None = None) -> int:
    """Open `name` below `dirfd` with flags, never through a symlink; with
    `expect`, refuse (ESTALE) a file that is not the one looked up before."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    if expect is not None and ident(os.fstat(fd)) != expect:
        os.close(fd)
        raise stale(name)
    return fd


def open_dir(dirfd: int, name: str, expect: Ident | None = None) -> int:
    """Open the directory `name` below `dirfd` for reading and as an anchor."""
    return open_checked(dirfd, name, O_DIR, expect)


@dataclass
class DirIndex:
    """One lower directory, read once: its entries and the names it hides below it."""

    entries: dict[str, int] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    opaque: bool = False


# A lower layer merged into a directory, with the identity of its directory there.
Lower = tuple[int, Ident]


@dataclass(frozen=True)
class Entry:
    """Where a merged name lives: its top layer, that layer's lstat, and for a
    directory the lower layers whose contents merge into it (top first)."""

    layer: int
    st: os.stat_result
    lowers: tuple[Lower, ...] = ()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


class Dir:
    """A merged directory as lookups need it: its upper directory fd (when it is
    in the upper) and its lower layers with their directories' identities, top
    first; a lower directory's fd is asked for (`fd`) only when an index must be
    read or a name in it stat'ed, so a lookup over many layers opens nothing
    for the layers whose index is already in memory."""

    __slots__ = ("fd", "lowers", "upper")

    def __init__(self, upper: int | None, lowers: tuple[Lower, ...], fd: Callable[[int], int]) -> None:
        self.upper = upper
        self.lowers = lowers
        self.fd = fd


def _is_whiteout_entry(d: os.DirEntry[str]) -> bool:
    """Only entries that are neither files, dirs nor symlinks need the extra lstat."""
    if d.is_dir(follow_symlinks=False) or d.is_file(follow_symlinks=False) or d.is_symlink():
        return False
    return is_whiteout(d.stat(follow_symlinks=False))


class LayerStack:
    """The layer roots, opened once, and the lower-directory indexes."""

    def __init__(self, upper: str | None, lowers: list[str]) -> None:
        self.paths: list[str | None] = [upper, *lowers]
        self.root_fds: list[int | None] = [
            None if p is None else os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            for p in self.paths
        ]
        self._index: dict[tuple[int, Ident], DirIndex] = {}

    def close(self) -> None:
        for i, fd in enumerate(self.root_fds):
            if fd is not None:
                os.close(fd)
                self.root_fds[i] = None

    @property
    def has_upper(self) -> bool:
        return self.root_fds[UPPER] is not None

    @property
    def lower_layers(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.root_fds)))

    def root_fd(self, layer: int) -> int:
        fd = self.root_fds[layer]
        assert fd is not None, "no upper layer on a read-only mount"
        return fd

    def index(self, layer: int, fd: Callable[[int], int], known: Ident) -> DirIndex:
        """The index of a lower directory, by identity; read (through `fd`) on first use."""
        idx = self._index.get((layer, known))
        if idx is None:
            idx = self._index[(layer, known)] = self._read_dir(fd(layer))
        return idx

    def _opaque(self, layer: int, parent_fd: int, name: str, known: Ident) -> bool:
        """Whether the lower directory `name` hides what is below it."""
        idx = self._index.get((layer, known))
        if idx is None:
            try:
                fd = open_dir(parent_fd, name, known)
            except OSError:
                return True  # changed under us (a clone's live source): show nothing below
            try:
                idx = self._index[(layer, known)] = self._read_dir(fd)
            finally:
                os.close(fd)
        return idx.opaque

    @staticmethod
    def _read_dir(fd: int) -> DirIndex:
        idx = DirIndex(opaque=has_opaque_xattr(fd))
        with os.scandir(fd) as it:
            for d in it:
                name = d.name
                if is_marker(name):
                    hidden = whited_out_name(name)
                    if hidden is None:
                        idx.opaque = True
                    else:
                        idx.hidden.add(hidden)
                elif d.is_dir(follow_symlinks=False):
                    idx.entries[name] = DIR
                elif _is_whiteout_entry(d):
                    idx.entries[name] = WHITEOUT
                else:
                    idx.entries[name] = OTHER
        return idx

    def root_entry(self) -> Entry:
        top = UPPER if self.has_upper else 1
        lowers = tuple((layer, ident(os.fstat(self.root_fd(layer)))) for layer in self.lower_layers)
        return Entry(top, os.fstat(self.root_fd(top)), lowers)

    def child(self, parent: Dir, name: str) -> Entry | None:
        """Resolve `name` in a merged directory; None when nothing visible has it.
        Upper names are literal (only a whiteout hides); lower `.wh.` names are
        the OCI/AUFS markers and never resolve."""
        top: tuple[int, os.stat_result] | None = None
        lowers: list[Lower] = []
        if parent.upper is not None:
            try:
                st = os.stat(name, dir_fd=parent.upper, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if is_whiteout(st):
                    return None
                if not stat.S_ISDIR(st.st_mode) or has_opaque_xattr(at(parent.upper, name)):
                    return Entry(UPPER, st)
                top = (UPPER, st)
        if is_marker(name):
            return None if top is None else Entry(top[0], top[1])
        for i, (layer, known) in enumerate(parent.lowers):
            idx = self.index(layer, parent.fd, known)
            kind = idx.entries.get(name)
            if kind is None:
                if name in idx.hidden:
                    break
                continue
            if kind == WHITEOUT:
                break
            fd = parent.fd(layer)
            try:
                lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone from a live lower (a clone's source) since it was read
            if kind == OTHER or not stat.S_ISDIR(lst.st_mode):
                if top is None:
                    return Entry(layer, lst)
                break
            if top is None:
                top = (layer, lst)
            lowers.append((layer, ident(lst)))
            if name in idx.hidden or (i + 1 < len(parent.lowers)
                                      and self._opaque(layer, fd, name, ident(lst))):
                break
        if top is None:
            return None
        return Entry(top[0], top[1], tuple(lowers))

    def listing(self, parent: Dir) -> list[str]:
        """Names of a merged directory: upper first, each lower's new names after."""
        names: dict[str, None] = {}
        hidden: set[str] = set()
        if parent.upper is not None:
            with os.scandir(parent.upper) as it:
                for d in it:
                    if _is_whiteout_entry(d):
                        hidden.add(d.name)
                    else:
                        names[d.name] = None
        for layer, known in parent.lowers:
            idx = self.index(layer, parent.fd, known)
            for name, kind in idx.entries.items():
                if name in hidden or name in names:
                    continue
                if kind == WHITEOUT:
                    hidden.add(name)
                else:
                    names[name] = None
            hidden |= idx.hidden
        return list(names)

    def upper_whiteouts(self, fd: int) -> list[str]:
        """The whiteouts in an upper directory (to drop once it is opaque)."""
        with os.scandir(fd) as it:
            return [d.name for d in it if _is_whiteout_entry(d)]
