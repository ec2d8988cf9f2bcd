"""Lookup through the layer stack: which layer holds a name, what merges under
a directory, what a merged directory lists.

Layer 0 is the upper (absent on a read-only mount), layers 1..n the lowers,
top first. Lower layers never change while mounted, so each lower directory
is read once into a `DirIndex` and answered from memory afterwards; the upper
is asked directly, since this process is its only writer but also changes it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .whiteout import has_opaque_xattr, is_marker, is_whiteout, whited_out_name

UPPER = 0

# Kinds of entry in a lower directory.
DIR, OTHER, WHITEOUT = 1, 2, 3


@dataclass
class DirIndex:
    """One lower directory, read once: its entries and the names it hides below it."""

    entries: dict[str, int] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    opaque: bool = False


@dataclass(frozen=True)
class Entry:
    """Where a merged name lives: its top layer, that layer's lstat, and for a
    directory the lower layers whose contents merge into it (top first)."""

    layer: int
    st: os.stat_result
    lowers: tuple[int, ...] = ()

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def _is_whiteout_entry(d: os.DirEntry[str]) -> bool:
    """Only entries that are neither files, dirs nor symlinks need the extra lstat."""
    if d.is_dir(follow_symlinks=False) or d.is_file(follow_symlinks=False) or d.is_symlink():
        return False
    return is_whiteout(d.stat(follow_symlinks=False))


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class LayerStack:
    def __init__(self, upper: str | None, lowers: list[str]) -> None:
        self.roots: list[str | None] = [upper, *(os.path.abspath(p) for p in lowers)]
        if upper is not None:
            self.roots[UPPER] = os.path.abspath(upper)
        self._index: dict[tuple[int, str], DirIndex] = {}

    @property
    def has_upper(self) -> bool:
        return self.roots[UPPER] is not None

    @property
    def lower_layers(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.roots)))

    def real(self, layer: int, rel: str) -> str:
        root = self.roots[layer]
        assert root is not None, "no upper layer on a read-only mount"
        return f"{root}/{rel}" if rel else root

    def index(self, layer: int, rel: str) -> DirIndex:
        key = (layer, rel)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = self._read_dir(self.real(layer, rel))
        return idx

    @staticmethod
    def _read_dir(path: str) -> DirIndex:
        idx = DirIndex(opaque=has_opaque_xattr(path))
        with os.scandir(path) as it:
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
        return Entry(top, os.lstat(self.real(top, "")), self.lower_layers)

    def child(self, parent_rel: str, parent_lowers: tuple[int, ...], name: str,
              with_upper: bool = True) -> Entry | None:
        """Resolve `name` in a merged directory; None when nothing visible has it."""
        rel = join(parent_rel, name)
        top: tuple[int, os.stat_result] | None = None
        lowers: list[int] = []
        if with_upper and self.has_upper:
            try:
                st = os.lstat(self.real(UPPER, rel))
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                return None
            else:
                if is_whiteout(st):
                    return None
                if not stat.S_ISDIR(st.st_mode) or has_opaque_xattr(self.real(UPPER, rel)):
                    return Entry(UPPER, st)
                top = (UPPER, st)
        for layer in parent_lowers:
            idx = self.index(layer, parent_rel)
            kind = idx.entries.get(name)
            if kind is None:
                if name in idx.hidden:
                    break
                continue
            if kind == WHITEOUT:
                break
            if kind == OTHER:
                if top is None:
                    return Entry(layer, os.lstat(self.real(layer, rel)))
                break
            if top is None:
                top = (layer, os.lstat(self.real(layer, rel)))
            lowers.append(layer)
            if name in idx.hidden or self.index(layer, rel).opaque:
                break
        if top is None:
            return None
        return Entry(top[0], top[1], tuple(lowers))

    def in_lowers(self, parent_rel: str, parent_lowers: tuple[int, ...], name: str) -> bool:
        """Whether removing the upper's `name` would uncover something: then a
        whiteout must stay in its place."""
        return self.child(parent_rel, parent_lowers, name, with_upper=False) is not None

    def listing(self, rel: str, in_upper: bool, lowers: tuple[int, ...]) -> list[str]:
        """Names of a merged directory: upper first, each lower's new names after."""
        names: dict[str, None] = {}
        hidden: set[str] = set()
        if in_upper:
            with os.scandir(self.real(UPPER, rel)) as it:
                for d in it:
                    if is_marker(d.name):
                        continue
                    if _is_whiteout_entry(d):
                        hidden.add(d.name)
                    else:
                        names[d.name] = None
        for layer in lowers:
            idx = self.index(layer, rel)
            for name, kind in idx.entries.items():
                if name in hidden or name in names:
                    continue
                if kind == WHITEOUT:
                    hidden.add(name)
                else:
                    names[name] = None
            hidden |= idx.hidden
        return list(names)

    def first_lower_dir(self, rel: str) -> int | None:
        """The lower layer a visible directory's metadata comes from on copy-up."""
        for layer in self.lower_layers:
            if os.path.isdir(self.real(layer, rel)) and not os.path.islink(self.real(layer, rel)):
                return layer
        return None
