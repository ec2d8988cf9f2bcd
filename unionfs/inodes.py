"""The inode table: FUSE inode numbers, and the nodes the kernel knows.

Numbers come from the backing file, as the kernel's overlayfs derives st_ino,
so they are the same after a remount: a file's own st_ino when it lives on the
filesystem of the first layer, with the filesystem's index in the top bits
otherwise (as overlayfs's xino does). A copied-up file keeps the number its
lower file had for the life of the mount, and hard links in the upper share a
number. Hard links in a lower layer do not: FUSE tells an open only the
inode, and copy-up must know which name is written, since it breaks the link
as the kernel does; each such name gets a number hashed from the file and the
name.

A node knows where its file is as (parent node, name), never as a path: a
rename moves one node and everything below it follows untouched, and an
unlinked node has no name at all (it is reached through the fds of its open
handles). A directory node keeps a directory fd for each layer it lives in,
opened from its parent's fd without following symlinks and checked to be the
directory looked up; those fds are a bounded cache, trimmed after each request
(never during one, so no fd a request holds is closed under it).
"""

from __future__ import annotations

import os
import resource
import stat
from collections import OrderedDict
from dataclasses import dataclass, field

import pyfuse3

from .layers import UPPER, Dir, Entry, Ident, LayerStack, Lower, ident, open_dir, stale

Key = tuple[int, int] | tuple[int, int, int, str]

# Directory fds kept open between requests (each is one openat to reopen): at
# most this many, and at most a quarter of the fd limit (the rest is for the
# files the container opens).
DIR_FDS = 4096


def _dir_fd_bound() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(DIR_FDS, soft // 4)) if soft != resource.RLIM_INFINITY else DIR_FDS
_INO_BITS = 48


def _hashed(text: str) -> int:
    """A number in the top half of the space, from text (the same in every mount);
    xxhash is imported here, on first need, not at every mount's start-up."""
    import xxhash

    return (1 << 63) | (xxhash.xxh3_64_intdigest(text) >> 1)


@dataclass(eq=False)
class Node:
    ino: int
    parent: Node | None
    name: str
    layer: int
    ident: Ident  # of the real file in `layer`
    is_dir: bool
    lowers: tuple[Lower, ...] = ()
    nlookup: int = 0
    handles: int = 0
    # Other names of the same upper file (hard links), so one can stand in when the name goes.
    aliases: list[tuple[Node, str]] = field(default_factory=list)
    unlinked: bool = False
    fds: dict[int, int] = field(default_factory=dict)

    @property
    def in_upper(self) -> bool:
        return self.layer == UPPER

    @property
    def merged(self) -> bool:
        """A directory whose contents come from more than one layer."""
        return self.is_dir and len(self.lowers) + (self.layer == UPPER) > 1

    def ident_in(self, layer: int) -> Ident:
        if layer == self.layer:
            return self.ident
        for lay, i in self.lowers:
            if lay == layer:
                return i
        raise stale()


class InodeTable:
    def __init__(self, stack: LayerStack, root: Entry) -> None:
        self.stack = stack
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[Key, int] = {}
        self._taken: dict[int, Key] = {}
        self._devs: dict[int, int] = {}
        for fd in stack.root_fds:
            if fd is not None:
                self._devs.setdefault(os.fstat(fd).st_dev, len(self._devs))
        self._lru: OrderedDict[tuple[Node, int], None] = OrderedDict()
        self._lru_bound = _dir_fd_bound()
        self.root = Node(pyfuse3.ROOT_INODE, None, "", root.layer, ident(root.st), True, root.lowers,
                         nlookup=1)
        for layer, fd in enumerate(stack.root_fds):
            if fd is not None:
                self.root.fds[layer] = fd  # pinned: never in the LRU, never closed
        self._by_key[ident(root.st)] = pyfuse3.ROOT_INODE
        self._taken[pyfuse3.ROOT_INODE] = ident(root.st)
        self.nodes[self.root.ino] = self.root

    # ---- numbers ---------------------------------------------------------------------------

    @staticmethod
    def _key(st: os.stat_result, layer: int, parent: Node | None, name: str) -> Key:
        if layer != UPPER and st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) and parent is not None:
            return (st.st_dev, st.st_ino, parent.ino, name)
        return (st.st_dev, st.st_ino)

    def _derive(self, key: Key) -> int:
        dev, ino = key[0], key[1]
        dev_i = self._devs.setdefault(dev, len(self._devs))
        if len(key) == 2 and ino < (1 << _INO_BITS) and dev_i < (1 << (63 - _INO_BITS)):
            return (dev_i << _INO_BITS) | ino
        return _hashed(repr(key))

    def number(self, st: os.stat_result, layer: int = UPPER, parent: Node | None = None,
               name: str = "") -> int:
        key = self._key(st, layer, parent, name)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._derive(key)
            # Taken by another file the kernel still knows (or the root's number): probe on.
            while ino <= pyfuse3.ROOT_INODE or (self._taken.get(ino, key) != key and ino in self.nodes):
                ino = _hashed(str(ino))
            self._by_key[key] = ino
            self._taken[ino] = key
        return ino

    def copied_up(self, node: Node, upper_st: os.stat_result) -> None:
        """The node's file is now its upper copy: same number, new identity."""
        self._by_key[(upper_st.st_dev, upper_st.st_ino)] = node.ino
        node.layer, node.ident = UPPER, ident(upper_st)

    def uncopied(self, node: Node, layer: int, was: Ident) -> None:
        """A copy-up taken back: the node is its lower file again."""
        self._by_key.pop(node.ident, None)
        fd = node.fds.pop(UPPER, None)
        if fd is not None:
            os.close(fd)
            self._lru.pop((node, UPPER), None)
        node.layer, node.ident = layer, was

    def forget_key(self, st: os.stat_result) -> None:
        """The real file is gone: its identity may be reused by a new file."""
        self._by_key.pop((st.st_dev, st.st_ino), None)

    # ---- nodes -----------------------------------------------------------------------------

    def attach(self, parent: Node, name: str, entry: Entry) -> Node:
        """The node for a name just resolved; the caller counts the lookup."""
        ino = self.number(entry.st, entry.layer, parent, name)
        node = self.nodes.get(ino)
        if node is None:
            node = Node(ino, parent, name, entry.layer, ident(entry.st), entry.is_dir, entry.lowers)
            self.nodes[ino] = node
            return node
        if node.lowers != entry.lowers:
            self._close_fds(node, keep=UPPER)
        node.layer, node.ident, node.lowers = entry.layer, ident(entry.st), entry.lowers
        if node.parent is not parent or node.name != name:
            if node.is_dir or node.unlinked:
                node.parent, node.name = parent, name
            elif (parent, name) not in node.aliases:
                node.aliases.append((parent, name))
        node.unlinked = False
        return node

    def add_alias(self, node: Node, parent: Node, name: str) -> None:
        node.aliases.append((parent, name))

    def lookup(self, node: Node, n: int = 1) -> None:
        node.nlookup += n

    def forget(self, ino: int, n: int) -> None:
        node = self.nodes.get(ino)
        if node is None:
            return
        node.nlookup -= n
        self.drop_unused(node)

    def drop_unused(self, node: Node) -> None:
        """Forget a node neither the kernel nor an open handle refers to."""
        if node.nlookup <= 0 and node.handles <= 0 and node.ino != pyfuse3.ROOT_INODE:
            if self.nodes.get(node.ino) is node:
                del self.nodes[node.ino]
            self._close_fds(node)

    def release_handle(self, node: Node) -> None:
        node.handles -= 1
        self.drop_unused(node)

    def removed(self, node: Node, parent: Node, name: str) -> None:
        """The name (parent, name) of node is gone; it lives on under another, or unlinked."""
        if node.parent is parent and node.name == name:
            if node.aliases:
                node.parent, node.name = node.aliases.pop()
            else:
                node.unlinked = True
        elif (parent, name) in node.aliases:
            node.aliases.remove((parent, name))

    def moved(self, node: Node, old_parent: Node, old: str, new_parent: Node, new: str) -> None:
        """The name (old_parent, old) of node is now (new_parent, new)."""
        if node.parent is old_parent and node.name == old:
            node.parent, node.name = new_parent, new
        elif (old_parent, old) in node.aliases:
            node.aliases[node.aliases.index((old_parent, old))] = (new_parent, new)

    # ---- directory fds ---------------------------------------------------------------------

    def dirfd(self, node: Node, layer: int) -> int:
        """An fd of node's directory in `layer`, reached from the layer's root one
        component at a time, each checked against the identity looked up."""
        fd = node.fds.get(layer)
        if fd is not None:
            if node.parent is not None:
                self._lru.move_to_end((node, layer))
            return fd
        chain = []
        n = node
        while n.fds.get(layer) is None:
            if n.parent is None:
                raise stale()
            chain.append(n)
            n = n.parent
        fd = n.fds[layer]
        for n in reversed(chain):
            fd = open_dir(fd, n.name, n.ident_in(layer))
            n.fds[layer] = fd
            self._lru[(n, layer)] = None
        return fd

    def view(self, node: Node, with_upper: bool = True) -> Dir:
        """The merged directory node as the layer stack reads it."""
        upper = self.dirfd(node, UPPER) if with_upper and node.in_upper else None
        return Dir(upper, node.lowers, lambda layer: self.dirfd(node, layer))

    def _close_fds(self, node: Node, keep: int | None = None) -> None:
        if node.parent is None:
            return
        for layer in [lay for lay in node.fds if lay != keep]:
            os.close(node.fds.pop(layer))
            self._lru.pop((node, layer), None)

    def close(self) -> None:
        """Close every cached directory fd (the layer roots are the stack's)."""
        while self._lru:
            (node, layer), _ = self._lru.popitem()
            fd = node.fds.pop(layer, None)
            if fd is not None:
                os.close(fd)

    def trim(self) -> None:
        """Close the least recently used directory fds beyond the bound (between requests)."""
        while len(self._lru) > self._lru_bound:
            (node, layer), _ = self._lru.popitem(last=False)
            fd = node.fds.pop(layer, None)
            if fd is not None:
                os.close(fd)
