"""The inode table: FUSE inode numbers for merged paths.

A number is tied to the identity (st_dev, st_ino) of the real file behind a
name, and that tie is kept for the life of the mount, so a file keeps its
st_ino when the kernel forgets and re-looks it up, and when it is copied up
(the upper copy's identity is tied to the same number). Hard links in the
upper share a number. Hard links in a lower layer do not: FUSE tells an open
only the inode, and copy-up must know which name is being written, since it
breaks the link as the kernel's overlayfs does. Nodes (path, layer, lookup
count) exist only while the kernel references them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import pyfuse3

from .layers import UPPER, Entry

Key = tuple[int, int] | tuple[int, int, str]


def key_of(st: os.stat_result, layer: int = UPPER, rel: str = "") -> Key:
    if layer != UPPER and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        return (st.st_dev, st.st_ino, rel)
    return (st.st_dev, st.st_ino)


@dataclass(eq=False)
class Node:
    ino: int
    path: str
    layer: int
    is_dir: bool
    lowers: tuple[int, ...] = ()
    nlookup: int = 0
    handles: int = 0
    # Other merged names of the same file (hard links), so one can stand in when `path` goes.
    aliases: set[str] = field(default_factory=set)
    unlinked: bool = False

    @property
    def in_upper(self) -> bool:
        return self.layer == UPPER

    @property
    def merged(self) -> bool:
        """A directory whose contents come from more than one layer."""
        return self.is_dir and len(self.lowers) + (self.layer == UPPER) > 1


class InodeTable:
    def __init__(self, root: Entry) -> None:
        self.nodes: dict[int, Node] = {}
        self.by_path: dict[str, Node] = {}
        self._by_key: dict[Key, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1
        self.root = Node(pyfuse3.ROOT_INODE, "", root.layer, True, root.lowers, nlookup=1)
        self._by_key[key_of(root.st)] = self.root.ino
        self._add(self.root)

    def _add(self, node: Node) -> None:
        self.nodes[node.ino] = node
        self.by_path[node.path] = node

    def ino_for(self, st: os.stat_result, layer: int = UPPER, rel: str = "") -> int:
        k = key_of(st, layer, rel)
        ino = self._by_key.get(k)
        if ino is None:
            ino = self._by_key[k] = self._next
            self._next += 1
        return ino

    def attach(self, rel: str, entry: Entry) -> Node:
        """The node for a name just resolved; the caller counts the lookup."""
        ino = self.ino_for(entry.st, entry.layer, rel)
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, rel, entry.layer, entry.is_dir, entry.lowers)
            self._add(node)
            return node
        node.layer, node.lowers = entry.layer, entry.lowers
        if node.path != rel:
            if not node.is_dir and not node.unlinked and self.by_path.get(node.path) is node:
                node.aliases.add(rel)
            else:
                self._move(node, rel)
        node.unlinked = False
        return node

    def copied_up(self, lower_st: os.stat_result, layer: int, rel: str, upper_st: os.stat_result) -> None:
        """Tie the upper copy to the number the lower file had."""
        self._by_key[key_of(upper_st)] = self.ino_for(lower_st, layer, rel)

    def forget_key(self, st: os.stat_result) -> None:
        """The real file is gone: its identity may be reused by a new file."""
        self._by_key.pop(key_of(st), None)

    def lookup(self, node: Node, n: int = 1) -> None:
        node.nlookup += n

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup -= n
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.nlookup <= 0 and node.handles <= 0 and node.ino != pyfuse3.ROOT_INODE:
            del self.nodes[node.ino]
            if self.by_path.get(node.path) is node:
                del self.by_path[node.path]

    def release_handle(self, node: Node) -> None:
        node.handles -= 1
        self._maybe_drop(node)

    def _move(self, node: Node, rel: str) -> None:
        if self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        node.path = rel
        self.by_path[rel] = node

    def removed(self, rel: str) -> Node | None:
        """A merged name is gone; its node keeps living on another name, or unlinked."""
        node = self.by_path.pop(rel, None)
        if node is None:
            for n in self.nodes.values():
                n.aliases.discard(rel)
            return None
        if node.aliases:
            node.path = node.aliases.pop()
            self.by_path[node.path] = node
        else:
            node.unlinked = True
        return node

    def renamed(self, old: str, new: str) -> None:
        """Move a name and, for a directory, every known name below it."""
        self.removed(new)
        node = self.by_path.get(old)
        if node is not None:
            self._move(node, new)
        prefix = old + "/"
        for path in [p for p in self.by_path if p.startswith(prefix)]:
            self._move(self.by_path[path], new + path[len(old):])
