"""How much a volume holds: a walk that never leaves the tree or its filesystem, never
follows a symlink (not even one swapped in for the top directory itself), and counts
hard-linked files once. A container can make the tree as deep as it likes: the walk is
anchored to fds and does not recurse (`common.dirwalk`).

Docker calls Get (and so this) several times per `docker run`, so the walk has
a budget: past it the size is reported as -1, Docker's "not computed"."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from common.dirwalk import O_DIR, walk

MAX_ENTRIES = 100_000
UNKNOWN = -1


def tree_size(top: Path | int, budget: int = MAX_ENTRIES) -> int:
    """Bytes of regular files below top (apparent size): a path, whose last component
    must not be a symlink, or an fd of the directory (an O_PATH one will do). 0 when top
    is missing; UNKNOWN when it holds more than budget entries, is not a directory or
    changes under the walk."""
    try:
        fd = os.open(top, O_DIR) if isinstance(top, Path) else os.open(".", O_DIR, dir_fd=top)
    except FileNotFoundError:
        return 0
    except OSError:
        return UNKNOWN
    seen: set[int] = set()
    total = 0
    try:
        with contextlib.closing(walk(fd, one_filesystem=True)) as entries:
            for _, e in entries:
                budget -= 1
                if budget < 0:
                    return UNKNOWN
                if not e.is_file(follow_symlinks=False):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                if st.st_ino not in seen:
                    if st.st_nlink > 1:
                        seen.add(st.st_ino)
                    total += st.st_size
    except OSError:
        return UNKNOWN
    finally:
        os.close(fd)
    return total
