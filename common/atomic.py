"""Replacing a file atomically: the one way strata writes state (records,
configs, tags, blob indexes). Readers and a crash at any moment see the old
content or the new, never a torn or empty file: the data goes to a fresh,
uniquely named temporary file beside the target (so two writers never share
it), is fsynced, renamed over the target, and the directory is fsynced so the
rename itself survives a power cut.

`write_atomic` takes the content at once; `atomic_file` is the same write for
content streamed in (an archive, a blob), too big to hold in memory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in a directory durable: a rename or a new entry is on disk only
    once its directory is fsynced."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o600) -> Iterator[BinaryIO]:
    """A file to write that replaces path (created with `mode`, root-only by default) when
    the block ends, and vanishes, leaving path as it was, when the block raises."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace path with data (created with `mode`, root-only by default)."""
    with atomic_file(path, mode) as f:
        f.write(data)
