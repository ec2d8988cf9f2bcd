"""What the FUSE daemon behind a mount costs, read from /proc: which process
it is, its CPU seconds and its peak resident memory."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def find(mountpoint: Path) -> int | None:
    """The process serving mountpoint: every daemon here keeps the mountpoint in its argv."""
    target = os.fsencode(mountpoint)
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if target in args:
            return int(entry.name)
    return None


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name; index 0 is field 3 (state)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of pid so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError(f"no VmHWM for process {pid}")


def alive(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def stop(pid: int, terminate: bool = False, grace: float = 10.0) -> None:
    """Wait for a daemon to exit after its unmount (SIGTERM first if terminate); kill it when it does not."""
    if terminate:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if _wait_exit(pid, grace):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_exit(pid, grace)
