"""The resident mount service behind `strata-unionfs` (unionfs/launcher.c,
unionfs.launch): keeps the daemon's imports loaded and forks a mount for each
request, so a mount costs a fork instead of a Python start-up.

One service per installation, listening on launch.socket_path() (a
SOCK_SEQPACKET socket in a root-only directory; only root's requests are
taken). A request is the command's arguments with four fds: its working
directory, its mount namespace, its stdout and stderr. For each, a child is
forked that joins that namespace and directory, runs the mount command with
those arguments and stdio (cli.serve_request: the same command line, the same
messages), sends back its status once the mount is in place and goes on as
the mount's daemon, in a session of its own: a mount that is live keeps
working when the service restarts or dies. The service stops by itself when
its code changes on disk (it would serve mounts with old code), or when
service.stop() asks; the next mount starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from common import cgroupfs, daemon, kernel

from . import cli, launch

_FDS = 4


def _code_stamp() -> tuple[tuple[str, int], ...]:
    here = Path(__file__).parent
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in here.glob("*.py")))


def _bind(path: str) -> tuple[socket.socket, int] | None:
    """Listen on path, unless another service answers there already; with the
    inode of the socket file (to remove it at the end only if it is still ours)."""
    os.makedirs(launch.SERVICE_DIR, mode=0o700, exist_ok=True)
    os.chmod(launch.SERVICE_DIR, 0o700)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with probe:
        try:
            probe.connect(path)
            return None
        except OSError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    tmp = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    old = os.umask(0o177)
    try:
        sock.bind(tmp)
    finally:
        os.umask(old)
    sock.listen(64)
    ino = os.stat(tmp).st_ino
    os.rename(tmp, path)  # atomic: a client sees the old socket or this one
    return sock, ino


def _serve_one(conn: socket.socket, msg: bytes, fds: list[int], caller: int) -> None:
    """In the forked child: become the caller's mount command, then its daemon, in
    the caller's cgroups (as a daemon the command forked itself would be: stopped
    with the caller's service, never with whichever one first started this)."""

    def report(status: int) -> None:
        with contextlib.suppress(OSError):
            conn.send(str(status).encode())
        conn.close()

    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()  # out of the service's session, as a daemon
        cgroupfs.join_cgroups_of(caller)
        cwd, ns, out, err = fds
        conn.send(b"+")
        if os.fstat(ns).st_ino != os.stat("/proc/self/ns/mnt").st_ino:
            kernel.setns(ns, kernel.CLONE_NEWNS)
        os.fchdir(cwd)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in fds:
            os.close(fd)
        body = msg[1:].decode("utf-8", "surrogateescape")
        cli.serve_request(body.split("\0") if body else [], report)
    except BaseException as e:  # the caller must get an answer, whatever happened
        with contextlib.suppress(OSError):
            os.write(2, f"{cli.PROG}: {e}\n".encode())
        if conn.fileno() >= 0:
            report(1)
    finally:
        os._exit(0)


def _peer(conn: socket.socket) -> tuple[int, int]:
    """The caller's (pid, uid), as the kernel saw them at connect()."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[0:4], sys.byteorder), int.from_bytes(creds[4:8], sys.byteorder)


def serve(path: str) -> int:
    bound = _bind(path)
    if bound is None:
        return 0  # one is running
    sock, ino = bound
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    stamp = _code_stamp()
    cli.warm_up()
    with sock:
        while True:
            conn, _ = sock.accept()
            with conn:
                caller, uid = _peer(conn)
                if uid != 0:
                    continue
                try:
                    msg, fds, flags, _ = socket.recv_fds(conn, 1 << 20, _FDS)
                except OSError:
                    continue
                try:
                    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                        continue  # cut short: the caller mounts by itself, with all of it
                    if msg == b"S" or _code_stamp() != stamp:
                        break  # a caller falls back to mounting itself
                    if len(fds) == _FDS and msg.startswith(b"M") and os.fork() == 0:
                        sock.close()
                        _serve_one(conn, msg, fds, caller)
                finally:
                    for fd in fds:
                        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == ino:  # not a newer service's
            os.unlink(path)
    return 0


def stop(path: str | None = None) -> None:
    """Stop the service of this installation if one runs (the tests end with
    it); mounts it made stay live."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        try:
            conn.connect(path or launch.socket_path())
            conn.send(b"S")
            conn.recv(1)  # EOF once it has closed its socket
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """`python -m unionfs.service` serves (the command starts it so); `--stop` stops
    this installation's service, if one runs (live mounts are not touched)."""
    if os.geteuid() != 0:
        print(f"{cli.PROG}: the mount service runs as root only", file=sys.stderr)
        return 1
    if "--stop" in (sys.argv[1:] if argv is None else argv):
        stop()
        return 0
    daemon.set_title([cli.PROG, "(mount service)"])
    return serve(launch.socket_path())


if __name__ == "__main__":
    sys.exit(main())
