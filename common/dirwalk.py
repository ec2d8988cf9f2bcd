"""Reading a directory tree anchored to fds, without recursion and with few fds open.

A tree may be deeper than Python's stack and than the fd limit (a container or a volume
can hold 5,000 levels), and may change while it is read (a container's upper, a volume a
container still writes). `DirStack` is the chain of directories from a top one down to
the current one, each entered by name with O_NOFOLLOW from its parent's fd, so nothing
is ever reached through a symlink or a path someone else can change; `walk` lists every
entry below a directory with it, depth first and without recursion; `common.tree`
removes a tree with it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Generator
from types import TracebackType

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Directory fds held: the deepest levels and one in this many above them.
_OPEN_LEVELS = 64


class DirStack:
    """The directories from `top_fd` (borrowed, never closed here) down to the current one.

    At most a window of them is open: the deepest _OPEN_LEVELS and one in _OPEN_LEVELS
    above. A level closed on the way down is reopened by name, from the nearest open one,
    on the way back, and must be the directory it was (device and inode) or the walk fails
    with ESTALE: a tree renamed meanwhile can make a walk fail, never make it read elsewhere.
    """

    def __init__(self, top_fd: int) -> None:
        self._top = top_fd
        self.names: list[str] = []
        self._fds: list[int | None] = []
        self._ids: list[tuple[int, int]] = []

    def __enter__(self) -> DirStack:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def fd(self) -> int:
        """The current directory's fd (the top's when nothing was entered)."""
        if not self._fds:
            return self._top
        last = len(self._fds) - 1
        if self._fds[last] is None:
            self._reopen(last)
        fd = self._fds[last]
        assert fd is not None
        return fd

    def _reopen(self, level: int) -> None:
        top = level
        while top >= 0 and self._fds[top] is None:
            top -= 1
        for k in range(top + 1, level + 1):
            above = self._fds[k - 1] if k else self._top
            assert above is not None
            fd = os.open(self.names[k], O_DIR, dir_fd=above)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._ids[k]:
                os.close(fd)
                raise OSError(errno.ESTALE, "directory replaced while being read", self.names[k])
            self._fds[k] = fd

    def push(self, name: str) -> os.stat_result:
        """Enter the subdirectory `name` of the current directory (never through a
        symlink); returns its stat."""
        fd = os.open(name, O_DIR, dir_fd=self.fd())
        st = os.fstat(fd)
        gone = len(self._fds) - _OPEN_LEVELS
        if gone > 0 and gone % _OPEN_LEVELS:
            closing = self._fds[gone]
            if closing is not None:
                os.close(closing)
                self._fds[gone] = None
        self.names.append(name)
        self._fds.append(fd)
        self._ids.append((st.st_dev, st.st_ino))
        return st

    def pop(self) -> None:
        """Back to the parent directory."""
        fd = self._fds.pop()
        self.names.pop()
        self._ids.pop()
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        while self._fds:
            self.pop()


def walk(
    top_fd: int, *, one_filesystem: bool = False
) -> Generator[tuple[DirStack, os.DirEntry[str]], None, None]:
    """Every entry below the directory `top_fd`, depth first, each with the DirStack whose
    current directory holds it (its fd for *at calls, its names for the way down). Symlinks
    are listed, never followed; with one_filesystem, directories of other mounts are listed
    but not entered. A subdirectory that vanished or was replaced before it was entered is
    skipped; a directory replaced above the walk ends it with ESTALE."""
    dev = os.fstat(top_fd).st_dev
    with DirStack(top_fd) as stack:
        # Per level, the subdirectories still to enter.
        todo: list[list[str]] = []
        listed = True  # the current directory is still to be listed
        while True:
            if listed:
                subdirs = []
                with os.scandir(stack.fd()) as it:
                    for entry in it:
                        yield stack, entry
                        if entry.is_dir(follow_symlinks=False) and (
                            not one_filesystem or entry.stat(follow_symlinks=False).st_dev == dev
                        ):
                            subdirs.append(entry.name)
                subdirs.reverse()
                todo.append(subdirs)
            while todo and not todo[-1]:
                todo.pop()
                if todo:
                    stack.pop()
            if not todo:
                return
            try:
                stack.push(todo[-1].pop())
                listed = True
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                listed = False
