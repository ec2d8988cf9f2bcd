"""The daemons the benchmarks and the tests start as child processes (dockerd,
containerd, the snapshotter, Ceph, strata serve, a registry): stopping one, the
end of its log for an error message, and finding and killing what one left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str] | None, timeout: float) -> int | None:
    """SIGTERM, then wait up to timeout; SIGKILL if it is still there. Its exit status,
    or None when it had to be killed (or was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def log_tail(log: Path, lines: int) -> str:
    """The last lines of a daemon's log ("" if it cannot be read)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def is_zombie(pid: int) -> bool:
    """Whether pid is gone but for its exit status (or gone altogether)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def pids_mentioning(needle: str) -> Iterator[int]:
    """Processes whose command line holds needle (a daemon's private root, say)."""
    raw = needle.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if raw in (entry / "cmdline").read_bytes():
                yield int(entry.name)
        except OSError:
            continue


def kill_all(pids: set[int], timeout: float = 10) -> None:
    """SIGKILL each of pids (never this process) and wait up to timeout for them to go."""
    pids = pids - {os.getpid()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)}
        time.sleep(0.05)
