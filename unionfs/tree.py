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

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# Directory fds held while removing: the deepest levels and one in this many above.
_OPEN_LEVELS = 64
# Rescans of a directory that keeps gaining entries before removal gives up.
_RESCANS = 100


def remove_tree(dirfd: int, name: str) -> None:
    """Remove `name` below `dirfd` and everything in it: depth first without
    recursion, every directory entered with O_NOFOLLOW from its parent's fd, at
    most a window of fds held (a level closed on the way down is reopened by
    name, from the nearest one still open, on the way back)."""
    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except IsADirectoryError:
        pass
    except FileNotFoundError:
        return
    names = [name]
    fds: list[int | None] = [os.open(name, O_DIR, dir_fd=dirfd)]
    rescans = 0

    def fd_at(level: int) -> int:
        """The fd of a level, reopening the closed ones from the nearest open above."""
        top = level
        while top >= 0 and fds[top] is None:
            top -= 1
        for k in range(top + 1, level + 1):
            above = fds[k - 1] if k else dirfd
            assert above is not None
            fds[k] = os.open(names[k], O_DIR, dir_fd=above)
        fd = fds[level] if level >= 0 else dirfd
        assert fd is not None
        return fd

    try:
        while names:
            fd = fd_at(len(names) - 1)
            with os.scandir(fd) as it:
                entries = [(d.name, d.is_dir(follow_symlinks=False)) for d in it]
            sub = next((n for n, is_dir in entries if is_dir), None)
            if sub is not None:
                # Keep the last _OPEN_LEVELS open, and every _OPEN_LEVELS-th above them.
                gone = len(names) - _OPEN_LEVELS
                if gone > 0 and gone % _OPEN_LEVELS and fds[gone] is not None:
                    os.close(fds[gone])  # type: ignore[arg-type]
                    fds[gone] = None
                names.append(sub)
                fds.append(os.open(sub, O_DIR, dir_fd=fd))
                continue
            for n, _ in entries:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(n, dir_fd=fd)
            parent = fd_at(len(names) - 2)
            try:
                os.rmdir(names[-1], dir_fd=parent)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY or rescans >= _RESCANS:
                    raise
                rescans += 1  # something was added meanwhile: look again
                continue
            os.close(fd)
            names.pop()
            fds.pop()
    finally:
        for f in fds:
            if f is not None:
                os.close(f)


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
