"""How much a volume holds: a walk that never leaves the tree or its filesystem
and counts hard-linked files once."""

from __future__ import annotations

import os
from pathlib import Path


def tree_size(top: Path) -> int:
    """Bytes of regular files below top (apparent size); 0 when top is missing."""
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
