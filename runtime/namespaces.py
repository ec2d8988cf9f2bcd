"""Linux namespaces and the root switch through ctypes on libc: unshare(2), setns(2)
and pivot_root(2), which Python 3.11's os module lacks."""

from __future__ import annotations

import ctypes
import os

from common.kernel import CLONE_NEWNS as CLONE_NEWNS
from common.kernel import libc as _libc
from common.kernel import setns as setns

_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# /proc/PID/ns/<name> for each namespace a container owns, in the order exec joins them:
# mnt last, because after it /proc is the container's.
NAMESPACES = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS, "net": CLONE_NEWNET, "pid": CLONE_NEWPID,
              "mnt": CLONE_NEWNS}

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}[os.uname().machine]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)), "pivot_root")


def ns_id(pid: int, name: str) -> str | None:
    """The namespace's identity (`net:[4026531992]`), or None when the process is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:
        return None
