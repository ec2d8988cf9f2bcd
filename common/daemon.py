"""Daemonizing, the one way strata does it (the mount program, the container monitor).

The caller must learn whether the daemon really came up, not merely that a fork
happened: `strata-unionfs` may exit 0 only once its mount answers, and `strata run
-d` only once the container's process has exec'd. So `daemonize` forks a child in
a new session (`setsid`: no controlling terminal, out of the caller's process
group and its ^C) and waits on a pipe for that child's one report: ready, or a
one-line reason it failed, which the caller shows its user. A child that dies
without a word is a failure too. The child decides when to `quiet()` its stdio
(to /dev/null, and its directory to `/`): the mount program first mounts, so
libfuse's own complaints still reach the caller's stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from common.errors import StrataError

_READY = b"R"
_FAILED = b"F"


class Notifier:
    """The daemon's end of the pipe: one report, readiness or a one-line failure."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def reported(self) -> bool:
        return self._fd is None

    def ready(self) -> None:
        self._send(_READY)

    def fail(self, reason: str) -> None:
        self._send(_FAILED + "; ".join(reason.strip().splitlines()).encode(errors="replace"))

    def _send(self, message: bytes) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):  # the parent may be gone: nothing to tell
                os.write(fd, message)
        finally:
            os.close(fd)


def quiet() -> None:
    """stdio to /dev/null and the working directory to `/`: a daemon must not write to
    the caller's terminal nor keep its directory (or that directory's mount) busy."""
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def daemonize(child: Callable[[Notifier], int], name: str = "daemon", double_fork: bool = False) -> None:
    """Run child(notifier) in a daemon; return in the parent once it reported ready,
    else raise StrataError with its reason ("the NAME died while starting" when it gave
    none). The child never returns here: it exits with child's return value, and an
    exception before its report is reported as the failure. double_fork: the daemon is
    a grandchild, so the caller, which goes on living, never has it as a child to reap.
    """
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _run_child(child, Notifier(wfd), double_fork)
    os.close(wfd)
    if double_fork:
        os.waitpid(pid, 0)  # the middle process leaves at once
    with os.fdopen(rfd, "rb") as r:
        answer = r.read()
    if answer == _READY:
        return  # the daemon lives on; a single-fork one is reaped by init once we are gone
    if not double_fork:
        os.waitpid(pid, 0)
    reason = answer[1:].decode(errors="replace") if answer.startswith(_FAILED) else ""
    raise StrataError(reason or f"the {name} died while starting")


def _run_child(child: Callable[[Notifier], int], notifier: Notifier, double_fork: bool) -> None:
    status = 1
    try:
        os.setsid()
        if double_fork and os.fork() != 0:
            os._exit(0)
        status = child(notifier)
    except BaseException as e:  # whatever it was, the parent hears it rather than hanging
        notifier.fail(str(e) or type(e).__name__)
    finally:
        notifier.fail("")  # no-op once reported: a child that said nothing died while starting
        os._exit(status)


def set_title(argv: Sequence[str]) -> None:
    """Show argv as this process's command line (/proc/PID/cmdline, ps, pkill -f):
    a daemon forked from a resident service should look like the command that asked
    for it, as a mount daemon of fuse-overlayfs does. The kernel shows the memory
    where the original arguments were (arg_start..arg_end in /proc/self/stat), so
    the new line is written there, cut to fit and padded with NULs; a process
    that needs room starts with a long last argument to make it."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    size = end - start
    if size <= 1:
        return
    line = b"\0".join(os.fsencode(a) for a in argv)[: size - 1]
    ctypes.memmove(start, line.ljust(size, b"\0"), size)
