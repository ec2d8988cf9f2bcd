"""The one client of the mount program, for every package that mounts a union
(the runtime's container roots, clone volumes, the benchmarks, the tests).

`Union` describes a layer stack; `mount` presents it at a mountpoint with
strata-unionfs (or the kernel's overlayfs, the reference, same options) and
returns only once it is live; `alive` tells a live FUSE mount from one whose
daemon died (ENOTCONN); `unmount` ends it (fusermount3 for FUSE, which also
ends the daemon, umount2 otherwise, a lazy detach for a dead or busy one).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import kernel
from common.errors import StrataError

PROG = "strata-unionfs"
# The kinds of union this client mounts.
STRATA, KERNEL = "strata-unionfs", "overlay"
_MOUNT_TIMEOUT = 60

StrPath = str | os.PathLike[str]


def program(configured: str | None = None) -> str:
    """The strata-unionfs to run: the configured one, else the one beside this
    Python (the running install), else the one on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).with_name(PROG)
    if beside.exists():
        return str(beside)
    found = shutil.which(PROG)
    if not found:
        raise StrataError(f"{PROG} not found next to the running Python or on PATH")
    return found


def _path(path: StrPath) -> str:
    text = os.fspath(path)
    if any(c in text for c in ",\n"):
        raise StrataError(f"cannot use {text} in a union: the path holds ',' or a newline")
    return text


def _lower(path: StrPath) -> str:
    """A lowerdir item: `\\` and `:` escaped as both strata-unionfs and the kernel read them."""
    return _path(path).replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True)
class Union:
    """A layer stack: lowers top first; with upper and work, writable."""

    lowers: Sequence[StrPath]
    upper: StrPath | None = None
    work: StrPath | None = None
    extra: Sequence[str] = field(default_factory=tuple)

    def options(self) -> str:
        """The `-o` string strata-unionfs and the kernel's overlayfs both take."""
        if not self.lowers:
            raise StrataError("a union needs at least one lower layer")
        opts = "lowerdir=" + ":".join(_lower(p) for p in self.lowers)
        if (self.upper is None) != (self.work is None):
            raise StrataError("upperdir and workdir go together")
        if self.upper is not None and self.work is not None:
            opts += f",upperdir={_path(self.upper)},workdir={_path(self.work)}"
        return ",".join([opts, *self.extra])


def mount(union: Union, mountpoint: StrPath, kind: str = STRATA, *, prog: str | None = None,
          pass_fds: Sequence[int] = (), timeout: float = _MOUNT_TIMEOUT) -> None:
    """Mount union at mountpoint; returns once it answers. A one-line StrataError
    (strata-unionfs's own reason) otherwise, with nothing mounted."""
    target = os.fspath(mountpoint)
    if kind == KERNEL:
        try:
            kernel.mount("overlay", target, "overlay", 0, union.options())
        except OSError as e:
            raise StrataError(f"kernel overlayfs: {e}") from None
        return
    if kind != STRATA:
        raise StrataError(f"unknown kind of union {kind!r} ({STRATA} or {KERNEL})")
    argv = [program(prog), "-o", union.options(), target]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds))
    except (OSError, subprocess.TimeoutExpired) as e:
        unmount(target)
        raise StrataError(f"{PROG}: {e}") from None
    if res.returncode != 0:
        reason = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise StrataError(reason if reason.startswith(PROG) else f"{PROG}: {reason}")


def alive(mountpoint: StrPath) -> bool:
    """Something is mounted there and answers: a FUSE mount whose daemon died fails
    statfs with ENOTCONN (statfs always reaches the daemon; a stat may be answered
    from the kernel's cache)."""
    if not kernel.is_mountpoint(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno != errno.ENOTCONN
    return True


def unmount(mountpoint: StrPath) -> None:
    """Unmount whatever union is at mountpoint (nothing there is fine): fusermount3
    for FUSE, which also ends the daemon; else umount2, then a lazy detach for a
    dead or busy mount. A one-line StrataError if it stays."""
    target = os.path.realpath(mountpoint)
    if not kernel.is_mountpoint(target):
        return
    fstype = next((t for _, tgt, t, _ in kernel.mounts() if tgt == target), "")
    if fstype.startswith("fuse"):
        res = subprocess.run(["fusermount3", "-u", target], capture_output=True, text=True)
        if res.returncode == 0:
            return
    try:
        kernel.umount(target)
    except OSError:
        try:
            kernel.umount(target, kernel.MNT_DETACH)
        except OSError as e:
            raise StrataError(f"unmount {target}: {e.strerror or e}") from None
