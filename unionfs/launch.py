"""`strata-unionfs`, the command: hands a mount to the resident mount service
(unionfs.service) when one runs, else mounts itself (unionfs.cli) and starts
the service for the next mount.

A mount is most of its time Python's start-up and imports (0.117 s at
ed7b01b for a mount that the kernel makes in 0.004 s). This module is what
runs first: it imports nothing beyond what the interpreter has loaded
already, so `make` installs it as a script run with `python -IS` (no site,
no user paths). The service, which has everything imported, forks the
mount for it; the command passes its arguments, its working directory, its
mount namespace and its stdout/stderr, and exits with the mount's status.
What the command line means is unionfs.cli's alone, as is every message.

Not through the service: -f/-d (the caller wants the daemon in the
foreground), --help and --version (cli answers them), layers given as the
caller's own fds (/proc/self/fd/N, as clone volumes pass them: the service
does not have them), and everything when STRATA_UNIONFS_DIRECT=1 is set or the
service cannot be reached.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

# What the service and this module share: where the socket is, how a request looks.
SERVICE_DIR = "/run/strata/unionfs"
DIRECT = "STRATA_UNIONFS_DIRECT"
_LOCAL = {"-f", "-d", "--foreground", "--debug", "-h", "--help", "-V", "--version"}
# Paths naming the caller's own descriptors (clone volumes pass their checked layers
# as /proc/self/fd/N): only a process that inherits them can mount them.
_OWN_FDS = ("/proc/self/fd/", "/dev/fd/")


def _local(args: Sequence[str]) -> bool:
    """Whether this process must mount by itself rather than through the service."""
    return bool(_LOCAL.intersection(args)) or any(p in a for a in args for p in _OWN_FDS)


def socket_path(package_dir: str | None = None) -> str:
    """The service socket of this installation: one per copy of the code, so two
    checkouts never serve each other's mounts."""
    here = os.path.dirname(os.path.abspath(package_dir or __file__))
    key = 0
    for ch in here.encode():
        key = (key * 131 + ch) % (1 << 61)
    return f"{SERVICE_DIR}/{key:x}.sock"


def _direct(argv: Sequence[str], start_service: bool) -> int:
    if start_service:
        _start_service()
    # -P: never import from the caller's working directory (we run as root).
    os.execv(sys.executable, [sys.executable, "-P", "-m", "unionfs.cli", *argv])
    return 1  # not reached


def _start_service() -> None:
    """Start the service in the background, detached; a failure only costs speed."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        # The last argument is room for the command lines its mount daemons show (common.daemon.set_title).
        os.posix_spawn(sys.executable, [sys.executable, "-P", "-m", "unionfs.service", " " * 65536],
                       {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")},
                       file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                                     (os.POSIX_SPAWN_DUP2, devnull, 2)],
                       setsid=True)
        os.close(devnull)
    except OSError:
        pass


def _through_service(argv: Sequence[str]) -> int | None:
    """The mount's exit status from the service, or None if no service took it."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    except OSError:
        return None
    with conn:
        try:
            conn.connect(socket_path())
        except OSError:
            return None
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            request = "\0".join(argv).encode("utf-8", "surrogateescape")
            socket.send_fds(conn, [b"M" + request], [cwd, ns, 1, 2])
        except OSError:
            return None
        finally:
            os.close(cwd)
            os.close(ns)
        try:
            taken = conn.recv(16)
        except OSError:
            taken = b""
        if taken != b"+":
            return None  # refused before forking the mount: nothing was done
        try:
            status = conn.recv(16)
        except OSError:
            status = b""
    if not status.isdigit():
        print("strata-unionfs: the mount service ended without an answer", file=sys.stderr)
        return 1
    return int(status)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get(DIRECT) == "1" or _local(args):
        return _direct(args, start_service=False)
    status = _through_service(args)
    if status is None:
        return _direct(args, start_service=os.geteuid() == 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
