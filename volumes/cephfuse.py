"""The life of a ceph-fuse mount, and the time limit on everything that talks to
a Ceph cluster.

A host reaches CephFS through `ceph-fuse` (this kind of machine has no ceph
kernel module): `mount` starts one on a directory of the filesystem, `state`
tells whether one is live, dead (its daemon was killed: every call on it fails
with ENOTCONN) or absent, `replace` swaps a dead one for a fresh one, `release`
ends one. Each mount carries a random tag in its client metadata
(`strata_mount=TAG`), by which the MDS can be told to evict that client's
session: the MDS keeps a dead client's capabilities and blocks every other
client on the files it held for 50-70 s (measured here) until it times the
session out, so a dead mount's session is evicted before its replacement is
used. Eviction is an MDS `tell` command and needs `mds 'allow *'`, more than a
volume key should have, so it runs with the configured eviction key.

A cluster that cannot be reached must not hang a Docker call: ceph-fuse gets
`client_mount_timeout`, the `ceph` CLI `--connect-timeout`, both a hard
subprocess timeout, and a call on a mount of an unresponsive cluster (which
blocks in the kernel until the cluster answers) runs through `bounded`, which
gives up after the configured time with a one-line error and leaves the blocked
thread to finish whenever the cluster answers.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TypeVar

from common import kernel
from common.errors import StrataError
from unionfs import client

from .config import CephConfig

T = TypeVar("T")
FSTYPE = "fuse.ceph-fuse"
# Slack beyond the configured timeout for a child to report its own timeout before it is killed.
_GRACE = 5.0


class ClusterTimeout(StrataError):
    """The cluster did not answer within the configured time."""


class Ticket:
    """Who decides a bounded call's outcome: the worker, by committing its change before
    the caller gives up, or the caller, by giving up first (the worker then undoes what
    it did). So a Mount that answered Err never takes a reference later, when the
    cluster comes back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ""

    def _settle(self, state: str) -> bool:
        with self._lock:
            self._state = self._state or state
            return self._state == state

    def commit(self) -> bool:
        """For the worker: True if its change stands (the caller still waits)."""
        return self._settle("committed")

    def abandon(self) -> bool:
        """For the caller: True if the worker had not committed yet (and now never will)."""
        return self._settle("abandoned")


def bounded(fn: Callable[[], T], timeout: float, what: str, ticket: Ticket | None = None) -> T:
    """fn() run in a thread of its own, given at most timeout seconds. A call into a
    mount of an unreachable cluster cannot be interrupted (the kernel waits for the
    FUSE daemon), so on timeout the thread is left to finish on its own and the caller
    gets ClusterTimeout at once, unless fn already committed through ticket."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name=f"cluster: {what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if ticket is None or ticket.abandon():
            raise ClusterTimeout(f"{what}: the Ceph cluster did not answer within {timeout:g} s")
        t.join()  # it committed: what is left of it is local
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def new_tag() -> str:
    return secrets.token_hex(8)


def _run(argv: list[str], timeout: float, what: str) -> str:
    """A ceph tool, killed with its process group if it outlives timeout; its stdout, or
    a one-line StrataError with the last line it printed on stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ClusterTimeout(f"{what}: the Ceph cluster did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        if proc.returncode == 110 or "timed out" in reason:  # ETIMEDOUT: client_mount_timeout passed
            raise ClusterTimeout(f"{what}: the Ceph cluster did not answer within {timeout - _GRACE:g} s")
        raise StrataError(f"{what}: {reason}")
    return out


def _common_args(cfg: CephConfig, name: str, keyring: str) -> list[str]:
    # No ceph.conf: everything a client needs is given here, so nothing is read from or
    # written to /etc/ceph, /var/log/ceph or /run/ceph.
    return ["-c", "/dev/null", "-m", cfg.monitors, "-n", name, "-k", keyring]


def mount(cfg: CephConfig, fs_path: str, mountpoint: Path, tag: str) -> None:
    """ceph-fuse of fs_path (a directory of the filesystem) on mountpoint; returns once it
    is live. ceph-fuse forks its daemon and exits 0 once the mount is up."""
    argv = [
        "ceph-fuse", *_common_args(cfg, cfg.client, cfg.keyring), "--client_fs", cfg.fs,
        "-r", fs_path, "--client_mount_timeout", f"{cfg.timeout:g}",
        "--client_metadata", f"strata_mount={tag}",
        "--log_to_file=false", "--log_to_stderr=false", "--err_to_stderr=true", "--admin_socket=",
        str(mountpoint),
    ]
    _run(argv, cfg.timeout + _GRACE, f"cannot mount CephFS {cfg.fs}:{fs_path}")
    if not kernel.is_mountpoint(mountpoint):
        raise StrataError(f"cannot mount CephFS {cfg.fs}:{fs_path}: ceph-fuse exited without a mount")


class State(Enum):
    ABSENT = "absent"
    LIVE = "live"
    DEAD = "dead"


def state(mountpoint: Path, timeout: float) -> State:
    """What is at mountpoint: no ceph-fuse mount, a live one, or one whose daemon is gone
    (ENOTCONN). ClusterTimeout when the mount does not answer in time (the cluster is
    unreachable: the daemon is alive but waiting)."""
    target = os.path.realpath(mountpoint)
    if not any(t == target and fs == FSTYPE for _, t, fs, _ in kernel.mounts()):
        return State.ABSENT
    try:  # an opendir always reaches the daemon (no kernel cache answers it), and ceph-fuse
        # answers it from its own caps; statvfs would cost a round trip to a monitor
        bounded(lambda: os.close(os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)),
                timeout, f"CephFS mount {mountpoint}")
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return State.DEAD
        raise StrataError(f"CephFS mount {mountpoint}: {e.strerror}") from None
    return State.LIVE


def evict(cfg: CephConfig, tag: str) -> None:
    """Tell the MDS to drop the session of the mount tagged tag (nothing if none has it)."""
    _run(["ceph", *_common_args(cfg, cfg.evict_client, cfg.evict_keyring),
          "--connect-timeout", f"{cfg.timeout:g}", "tell", "mds.*", "client", "evict",
          f"client_metadata.strata_mount={tag}"],
         cfg.timeout + _GRACE, "cannot evict a dead CephFS client")


def release(mountpoint: Path, timeout: float) -> None:
    """End the mount at mountpoint (fusermount3 -u, a lazy detach if busy or dead);
    nothing there is fine. The ceph-fuse daemon flushes and exits on its own."""
    bounded(lambda: client.unmount(mountpoint), timeout, f"unmount of {mountpoint}")


def retire(cfg: CephConfig, mountpoint: Path, tag: str | None, now: State) -> str:
    """Detach the mount at mountpoint unless it is absent, and when it is not live (its
    daemon died, or the host rebooted under it) evict the session it had, tagged tag:
    the MDS would otherwise keep that session's capabilities and block every other
    client on those files until it times the session out (300 s after a reboot).
    Returns what was done, one line ("" when nothing)."""
    done = []
    if now is not State.ABSENT:
        release(mountpoint, cfg.timeout)
        done.append(f"detached a {now.value} ceph-fuse mount")
    if now is not State.LIVE and tag is not None:
        try:
            evict(cfg, tag)
            done.append("evicted its session" if done else "evicted the session of a vanished mount")
        except StrataError as e:  # a new mount works; other clients may wait for the MDS's timeout
            done.append(f"could not evict its session: {e}")
    return ", ".join(done)


def ensure(cfg: CephConfig, fs_path: str, mountpoint: Path, tag: str | None,
           record_tag: Callable[[str], None]) -> tuple[str, str]:
    """Make mountpoint a live mount of fs_path. A live mount tagged `tag` (the recorded one)
    is kept; anything else is retired; then a new mount is made under a fresh tag, handed
    to record_tag before the mount exists (so a crash between the two never leaves a
    session nobody can name). Returns (the tag now mounted, what was done in one line,
    "" when nothing)."""
    now = state(mountpoint, cfg.timeout)
    if now is State.LIVE and tag is not None:
        return tag, ""
    done = retire(cfg, mountpoint, tag, now)
    fresh = new_tag()
    record_tag(fresh)
    mountpoint.mkdir(mode=0o755, exist_ok=True)
    mount(cfg, fs_path, mountpoint, fresh)
    return fresh, f"{done}, mounted again" if done else "mounted"
