"""One sample's view of a stack: mount it fresh (timing command start to a
usable mount), and take it down again, daemon included, whatever happens in
between: an error, a hung daemon, Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import kernel

from . import daemon
from .dataset import Stack
from .systems import System

FUSECTL = Path("/sys/fs/fuse/connections")


class MountError(Exception):
    """The system could not give a usable mount; the message is its own stderr line."""


@dataclass
class View:
    path: Path
    mount_seconds: float | None = None  # None: nothing was mounted (the plain directory)
    pid: int | None = None  # the FUSE daemon
    conn: int | None = None  # its connection in fusectl, to abort it when it hangs


@contextlib.contextmanager
def view(
    system: System, stack: Stack, scratch: Path, writes: Sequence[str] | None, timeout: float,
    readonly: bool = False,
) -> Iterator[View]:
    """A fresh view of stack for one sample, in scratch (created here, removed after).

    writes: the lower paths the sample changes; the plain directory gets a copy of
    just those to change (None: read-only, it reads the plain tree in place).
    readonly: the union is mounted without an upper layer."""
    scratch.mkdir(parents=True)
    mnt = scratch / "mnt"
    try:
        if not system.union:
            if writes is None:
                yield View(stack.plain)
                return
            mnt.mkdir()
            for rel in writes:
                src = stack.plain / rel
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, mnt / rel)
            yield View(mnt)
            return
        upper, work = scratch / "upper", scratch / "work"
        for d in (upper, work, mnt):
            d.mkdir()
        v: View | None = None
        try:
            cmd = system.mount_command(stack, None if readonly else upper, None if readonly else work, mnt)
            v = _mount(system, cmd, mnt, timeout)
            yield v
        finally:
            _unmount(mnt, v.pid if v else (daemon.find(mnt) if system.daemon else None))
    finally:
        if not kernel.is_mountpoint(mnt):  # never recurse into a live mount
            shutil.rmtree(scratch, ignore_errors=True)


def _mount(system: System, cmd: list[str], mnt: Path, timeout: float) -> View:
    # stderr goes to a file, not a pipe: the daemonized child inherits it and
    # would hold a pipe open for the life of the mount.
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        try:
            done = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise MountError(f"{Path(cmd[0]).name} did not return within {timeout:.0f} s") from None
        except OSError as e:
            raise MountError(f"{cmd[0]}: {e.strerror}") from None
        if done.returncode != 0:
            err.seek(0)
            lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
            raise MountError(
                lines[-1] if lines else f"{Path(cmd[0]).name} exited with status {done.returncode}"
            )
        deadline = start + timeout
        while True:
            if kernel.is_mountpoint(mnt):
                try:
                    os.listdir(mnt)
                    break
                except OSError as e:
                    why = f"mount not usable: {e.strerror}"
            else:
                why = "exited 0 but nothing is mounted"
            if time.perf_counter() > deadline:
                raise MountError(why)
            time.sleep(0.0005)
        seconds = time.perf_counter() - start
    if not system.daemon:
        return View(mnt, seconds)
    return View(mnt, seconds, daemon.find(mnt), os.minor(os.stat(mnt).st_dev))


def _unmount(mnt: Path, pid: int | None) -> None:
    was_mounted = _umount(mnt)
    if pid is not None:
        # A daemon interrupted before its mount went live would wait forever: ask it to go.
        daemon.stop(pid, terminate=not was_mounted)
        _umount(mnt)  # and one killed mid-start may have left its mount behind


def _umount(mnt: Path) -> bool:
    """Unmount mnt if something is mounted there (detached when it stays busy); whether it was."""
    for _ in range(100):
        if not kernel.is_mountpoint(mnt):
            return False
        try:
            kernel.umount(mnt)
            return True
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    kernel.umount(mnt, kernel.MNT_DETACH)
    return True


def abort(conn: int) -> None:
    """Abort a FUSE connection, so calls stuck on a hung daemon fail with ENOTCONN."""
    if not (FUSECTL / str(conn)).exists() and not kernel.is_mountpoint(FUSECTL):
        kernel.mount("fusectl", FUSECTL, "fusectl")
    (FUSECTL / str(conn) / "abort").write_text("1")
