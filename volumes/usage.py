"""How much a volume holds: a walk that never leaves the tree or its filesystem
and counts hard-linked files once.

Docker calls Get (and so this) several times per `docker run`, so the walk has
a budget: past it the size is reported as -1, Docker's "not computed"."""

from __future__ import annotations

import os
from pathlib import Path

MAX_ENTRIES = 100_000
UNKNOWN = -1


def tree_size(top: Path, budget: int = MAX_ENTRIES) -> int:
    """Bytes of regular files below top (apparent size); 0 when top is missing,
    UNKNOWN when it holds more than budget entries."""
    try:
        dev = os.lstat(top).st_dev
    except OSError:
        return 0
    seen: set[int] = set()
    total = 0
    stack = [str(top)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                budget -= 1
                if budget < 0:
                    return UNKNOWN
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.is_dir(follow_symlinks=False):
                    if st.st_dev == dev:
                        stack.append(e.path)
                elif e.is_file(follow_symlinks=False) and st.st_ino not in seen:
                    if st.st_nlink > 1:
                        seen.add(st.st_ino)
                    total += st.st_size
    return total
