"""What an overlay upper changed over its lower layers, as `docker diff` lists it:
("A", path) added, ("C", path) changed, ("D", path) deleted. One reading for the
runtime's `strata diff` and the GraphDriver's `Changes`.

The upper may belong to a running container, as deep as it likes: it is walked
anchored and without recursion (common.dirwalk); whiteouts are read as
unionfs.whiteout defines them. Lower layers are the store's own (root's, never
changed), looked up without following any symlink.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from common import dirwalk
from unionfs import whiteout

ADDED, CHANGED, DELETED = "A", "C", "D"


def changes(upper: Path, lowers: Sequence[Path]) -> list[tuple[str, str]]:
    """(kind, "/path") for every entry of the upper, sorted by path: a whiteout is a
    deletion, a name one of the lowers (top first) holds a change, anything else an
    addition. Raises OSError when the upper cannot be read."""
    out: list[tuple[str, str]] = []
    top = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dirs, entry in dirwalk.walk(top):
            rel = "/".join([*dirs.names, entry.name])
            if whiteout.is_whiteout(entry.stat(follow_symlinks=False)):
                out.append((DELETED, "/" + rel))
            else:
                out.append((CHANGED if any(_exists_in(lw, rel) for lw in lowers) else ADDED, "/" + rel))
    finally:
        os.close(top)
    return sorted(out, key=lambda x: x[1])


def _exists_in(layer: Path, rel: str) -> bool:
    """Whether a layer holds rel; past PATH_MAX one name at a time from the layer's fd."""
    if len(rel) < 3000:
        return os.path.lexists(layer / rel)
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in rel.split("/"):
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
