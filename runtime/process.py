"""Processes in containers: starting one inside namespaces (a container's first
process, or `exec` joining a running one) as a user of the container's own, and
knowing a process again later (pid plus start time). runtime.attach carries its
stdio once it runs.

Starting is two forks. The helper enters the namespaces (unshare for a new
container, setns for exec) and reports in; the parent then does what needs the
helper's pid from outside (cgroup membership, moving a veth into the new network
namespace) and lets it go on. The helper forks the real process -- PID 1 of a
new PID namespace -- which sets up its root, drops privileges and execs, and the
helper waits for it and exits with its status (128+N for a signal, as docker
reports). Setup errors travel back over a close-on-exec pipe, so "started" means
the exec happened."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import termios
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.errors import StrataError
from runtime import capabilities

EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                     signal.SIGUSR2)


class StartError(StrataError):
    """The process could not be started; `code` is what docker exits with then (127: not
    found, 126: not executable)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ProcessSpec:
    """What to exec and as whom: argv, KEY=VALUE environment, working dir, `user[:group]`,
    and its confinement: capabilities, a seccomp filter (a pyseccomp.SyscallFilter, built
    by runtime.seccomp; None: unconfined), no_new_privs."""

    args: list[str]
    env: list[str]
    cwd: str = "/"
    user: str = ""
    tty: bool = False
    caps: tuple[str, ...] = capabilities.DEFAULT
    seccomp: Any = None
    no_new_privs: bool = False


@dataclass
class Spawned:
    helper: int
    pid: int


# --- users, as the container's own /etc/passwd and /etc/group define them ---------------


def _table(path: str) -> list[list[str]]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary groups, home) for `user[:group]`, names or numbers."""
    name, _, group = (user or "0").partition(":")
    passwd = _table("/etc/passwd")
    entry = next((e for e in passwd if len(e) >= 6 and (e[0] == name or e[2] == name)), None)
    if entry is not None:
        uid, gid, home = int(entry[2]), int(entry[3]), entry[5] or "/"
        uname = entry[0]
    elif name.isdigit():
        uid, gid, home, uname = int(name), int(name) if name != "0" else 0, "/", ""
    else:
        raise StrataError(f"unable to find user {name}: no matching entries in passwd file")
    groups = _table("/etc/group")
    if group:
        g = next((e for e in groups if len(e) >= 3 and (e[0] == group or e[2] == group)), None)
        if g is not None:
            gid = int(g[2])
        elif group.isdigit():
            gid = int(group)
        else:
            raise StrataError(f"unable to find group {group}: no matching entries in group file")
    extra = sorted({int(e[2]) for e in groups if len(e) >= 4 and uname and uname in e[3].split(",")})
    return uid, gid, extra, home


def merge_env(env: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """env with each KEY=VALUE of overrides replacing any entry of the same KEY (appended last)."""
    out = list(env)
    for item in overrides:
        key = item.split("=", 1)[0]
        out = [x for x in out if x.split("=", 1)[0] != key] + [item]
    return out


def _env_with_defaults(env: list[str], home: str) -> dict[str, str]:
    out = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home}
    for item in env:
        k, _, v = item.partition("=")
        out[k] = v
    return out


# --- the child side ----------------------------------------------------------------------


def _become(spec: ProcessSpec, err_w: int) -> None:
    """In the final child: privileges, terminal, directory, then exec. Never returns."""
    uid, gid, groups, home = resolve_user(spec.user)
    env = _env_with_defaults(spec.env, home)
    if spec.tty:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    try:
        os.makedirs(spec.cwd, exist_ok=True)
        os.chdir(spec.cwd)
    except OSError as e:
        raise StrataError(f"working directory {spec.cwd}: {e.strerror}") from None
    # As runc: without no_new_privs the kernel takes a filter only from a process holding
    # CAP_SYS_ADMIN, so it goes in before the capabilities go; with it, as late as can be.
    if spec.seccomp is not None and not spec.no_new_privs:
        spec.seccomp.load()
    capabilities.become(spec.caps, uid, gid, groups)
    if spec.no_new_privs:
        capabilities.set_no_new_privs()
        if spec.seccomp is not None:
            spec.seccomp.load()
    for sig in (*FORWARDED_SIGNALS, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvpe(spec.args[0], spec.args, env)
    except FileNotFoundError:
        _fail(err_w, f"exec: {spec.args[0]!r}: executable file not found in $PATH", EXIT_NOT_FOUND)
    except OSError as e:
        _fail(err_w, f"exec: {spec.args[0]!r}: {e.strerror}", EXIT_CANNOT_EXEC)


def _fail(err_w: int, message: str, code: int) -> None:
    with contextlib.suppress(OSError):
        os.write(err_w, message.encode()[:4000])
    os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _close_fds_except(*keep: int) -> None:
    """The caller's other descriptors (a monitor's notify pipe, sockets, logs) must not live
    on in the container's processes."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def spawn(
    spec: ProcessSpec,
    stdio: tuple[int, int, int],
    enter: Callable[[], None],
    setup: Callable[[], None],
    outside: Callable[[int], None] = lambda pid: None,
) -> Spawned:
    """Start spec's process: `enter` runs in the helper (namespaces), `outside(helper pid)`
    in the caller, `setup` in the process itself before it drops privileges."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            os.close(err_r)
            os.setsid()
            for i, fd in enumerate(stdio):
                os.dup2(fd, i)
            enter()
            _close_fds_except(ready_w, go_r, err_w)
            os.write(ready_w, b"U")
            if os.read(go_r, 1) != b"G":
                os._exit(1)
            pid = os.fork()
            if pid == 0:
                try:
                    setup()
                    _become(spec, err_w)
                except StrataError as e:
                    _fail(err_w, str(e), EXIT_NOT_FOUND)
                except BaseException as e:  # anything at all goes back to the caller
                    _fail(err_w, f"container setup: {e}", EXIT_NOT_FOUND)
            os.write(ready_w, f"{pid}\n".encode())
            os.close(ready_w)
            os.close(err_w)
            for sig in FORWARDED_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    os._exit(exit_code(status))
                except InterruptedError:
                    continue
        except BaseException as e:
            _fail(err_w, f"entering namespaces: {e}", EXIT_NOT_FOUND)
    os.close(ready_w)
    os.close(go_r)
    os.close(err_w)
    try:
        if os.read(ready_r, 1) != b"U":
            raise StrataError(_read_all(err_r).decode(errors="replace") or "container helper died")
        outside(helper)
        os.write(go_w, b"G")
        raw = _read_all(ready_r)
        error = _read_all(err_r).decode(errors="replace")
        if error or not raw.strip():
            code = exit_code(os.waitpid(helper, 0)[1])
            raise StartError(error or "container process died while starting", code)
        return Spawned(helper, int(raw))
    except BaseException:
        with contextlib.suppress(ChildProcessError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)
            os.waitpid(helper, 0)
        raise
    finally:
        for fd in (ready_r, go_w, err_r):
            os.close(fd)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, an identity that
    survives pid reuse. None for a process that is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return None if fields[0] in (b"Z", b"X") else int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    st = start_time(pid)
    return st is not None and (started is None or st == started)

