"""Removing a directory tree: the one owner of it for every package.

A tree may be deeper than Python's stack (an image layer or a container can
hold 5,000 levels) and may change while it is removed (a container's upper, a
volume a container still writes): removal walks it depth first without
recursion, enters every directory by an fd opened with O_NOFOLLOW from its
parent's, and never follows a symlink, so whatever is planted in the tree,
only the tree goes.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from common.dirwalk import DirStack

# Rescans of a directory that keeps gaining entries before removal gives up.
_RESCANS = 100


def remove_tree(dirfd: int, name: str) -> None:
    """Remove `name` below `dirfd` and everything in it: depth first without
    recursion, every directory entered with O_NOFOLLOW from its parent's fd
    (dirwalk.DirStack, which holds a bounded window of fds)."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return
    rescans = 0
    with DirStack(dirfd) as dirs:
        dirs.push(name)
        while dirs.names:
            fd = dirs.fd()
            with os.scandir(fd) as it:
                entries = [(d.name, d.is_dir(follow_symlinks=False)) for d in it]
            sub = next((n for n, is_dir in entries if is_dir), None)
            if sub is not None:
                dirs.push(sub)
                continue
            for n, _ in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(n, dir_fd=fd)
            leaf = dirs.names[-1]
            dirs.pop()
            try:
                os.rmdir(leaf, dir_fd=dirs.fd())
            except OSError as e:
                if e.errno != errno.ENOTEMPTY or rescans >= _RESCANS:
                    raise
                rescans += 1  # something was added meanwhile: look again
                dirs.push(leaf)


def remove_path(path: str | os.PathLike[str]) -> None:
    """Remove the file or tree at path (its parent directory is trusted: the caller's
    own state); nothing there is not an error."""
    p = Path(path)
    try:
        parent = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_tree(parent, p.name)
    finally:
        os.close(parent)
