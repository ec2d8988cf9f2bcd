"""A private, throw-away Docker Engine for the benchmarks and the tests.

Only one dockerd can run on the machine (``/var/run/docker.sock`` and
``/run/docker/plugins`` are machine-wide) and several test suites and
``run_latency`` need one, so this module is the single place that starts it,
under an exclusive ``flock`` on ``/run/lock/strata-dockerd.lock`` held for the
daemon's whole life. It lives in benchmarks/ because benchmarks never import
tests (the tests may use the benchmarks' harness).

Usage::

    from benchmarks.dockerd import running_dockerd, busybox_rootfs_tar

    with running_dockerd() as d:            # blocks until the lock is ours; running_dockerd(
                                            #   ["--experimental", "-s", "strata"]) adds flags
        tar = busybox_rootfs_tar(tmp_path / "rootfs.tar", extra_dirs=["data"])
        d.docker("import", str(tar), "bb:data")
        out = d.docker("run", "--rm", "bb:data", "echo", "hi").stdout
        d.restart()                          # same data root, e.g. to test recovery
        d.crash(); d.start()                 # kill -9 everything (a power cut), then start again

As a pytest fixture (in your own conftest.py)::

    @pytest.fixture(scope="module")
    def dockerd():
        with running_dockerd() as d:
            yield d

``Dockerd`` fields: ``docker_bin`` (``/usr/bin/docker``, never the newer CLI in
/usr/local/bin), ``env`` (environment for docker CLI calls: DOCKER_HOST and a
private DOCKER_CONFIG), ``root`` (the temp dir holding data root, exec root,
pid file and ``dockerd.log``), ``host`` (the socket URL). ``d.docker(*args,
check=True, timeout=120, input=None)`` runs the CLI and returns the
CompletedProcess (text mode), raising DockerCommandError (stderr in its message)
on failure; ``--pull=never`` is added to ``run``/``create``.
``d.restart()`` stops and starts on the same data root; ``d.crash()`` kills
dockerd and all its processes at once, as a power cut would, then ``d.start()``.
``d.log_tail()`` returns the end of the daemon log (also printed to stderr when
the ``with`` body raises).

Teardown always happens, whatever the body did: SIGTERM (then SIGKILL after
30 s) to dockerd, kill any containerd/shim/container process left that
belongs to this instance, unmount everything under its root, remove its
cgroups (a private ``--cgroup-parent``) and ``rm -rf`` the root.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.busybox import build_rootfs

from . import processes

LOCK_PATH = "/run/lock/strata-dockerd.lock"
SOCKET_PATH = "/var/run/docker.sock"
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
# dockerd must find Debian's containerd, runc and docker-init, not anything in /usr/local.
_DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0


class DockerdError(RuntimeError):
    """dockerd could not be started (the message carries the end of its log)."""


class DockerCommandError(subprocess.CalledProcessError):
    """A failed docker CLI call; str() includes its stderr so test failures say why."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr.strip()}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 2.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _ping(path: str = SOCKET_PATH) -> bool:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Dockerd:
    """A running private dockerd; see the module docstring."""

    root: Path
    host: str = f"unix://{SOCKET_PATH}"
    docker_bin: str = DOCKER
    env: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def exec_root(self) -> Path:
        return self.root / "exec"

    @property
    def log_path(self) -> Path:
        return self.root / "dockerd.log"

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon; raises with stderr on failure when check."""
        argv = list(args)
        if argv and argv[0] in ("run", "create") and not any(a.startswith("--pull") for a in argv):
            argv.insert(1, "--pull=never")
        res = subprocess.run(
            [self.docker_bin, *argv], env=self.env, capture_output=True, text=True,
            timeout=timeout, input=input,
        )
        if check and res.returncode != 0:
            raise DockerCommandError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def log_tail(self, lines: int = 40) -> str:
        return processes.log_tail(self.log_path, lines)

    def start(self) -> None:
        """Start dockerd on this root and wait until it answers /_ping."""
        argv = [
            DOCKERD, "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
            "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host,
            "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            "--userland-proxy=false", "--cgroup-parent", self.cgroup_parent, *self.extra_args,
        ]
        env = {"PATH": _DAEMON_PATH, "HOME": str(self.root), "TMPDIR": str(self.root / "tmp")}
        (self.root / "tmp").mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while not _ping():
            if self.proc.poll() is not None:
                raise DockerdError(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DockerdError(f"dockerd did not answer within {_START_TIMEOUT:.0f}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop dockerd (SIGTERM, SIGKILL if it hangs) and kill whatever it left running."""
        processes.stop(self.proc, _STOP_TIMEOUT)
        self.proc = None
        self._kill_leftovers()

    def crash(self) -> None:
        """What a power cut does to Docker: SIGKILL dockerd, containerd, the shims and every
        container process of this instance at once, drop their mounts and the exec root (a
        reboot empties /run); the data root stays. start() afterwards."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        self._kill_leftovers()
        unmount_under(self.root)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same data root (what a daemon restart looks like)."""
        self.stop()
        self.start()

    def _kill_leftovers(self) -> None:
        """containerd, its shims and container processes of this instance, found by our root
        in their command line or by our cgroup parent, killed by pid."""
        processes.kill_all(set(processes.pids_mentioning(str(self.root)))
                           | set(pids_in_cgroups(self.cgroup_parent)))


def cgroup_dirs(parent: str) -> list[Path]:
    """Every cgroup directory (v1 hierarchies and the v2 mount) named by our cgroup parent."""
    base = Path("/sys/fs/cgroup")
    rel = parent.strip("/")
    candidates = [base / rel, *(h / rel for h in base.iterdir() if h.is_dir() and not h.is_symlink())]
    return [c for c in dict.fromkeys(candidates) if c.is_dir()]


def pids_in_cgroups(parent: str) -> Iterator[int]:
    for top in cgroup_dirs(parent):
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                yield from (int(x) for x in procs.read_text().split())


def remove_cgroups(parent: str) -> None:
    for top in cgroup_dirs(parent):
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def unmount_under(root: Path) -> None:
    """Lazily unmount every mount at or below root, deepest first."""
    prefix = str(root.resolve())
    for _ in range(3):
        targets = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            tgt = line.split()[1].encode().decode("unicode_escape")
            if tgt == prefix or tgt.startswith(prefix + "/"):
                targets.append(tgt)
        if not targets:
            return
        for tgt in sorted(set(targets), key=len, reverse=True):
            subprocess.run(["umount", "-l", tgt], capture_output=True)


@contextlib.contextmanager
def dockerd_lock() -> Iterator[None]:
    """Hold the machine-wide dockerd lock (blocking) for the duration."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def running_dockerd(extra_args: Sequence[str] = ()) -> Iterator[Dockerd]:
    """Start a private dockerd under the machine-wide lock, yield it, always tear it down.
    `extra_args` go to dockerd as they are, e.g. ("--experimental", "--storage-driver", "strata")."""
    with dockerd_lock():
        if _ping():
            raise DockerdError(f"a dockerd not started under {LOCK_PATH} answers on {SOCKET_PATH}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SOCKET_PATH)  # stale socket of a killed daemon; the lock says none runs
        root = Path(tempfile.mkdtemp(prefix="strata-dockerd-", dir="/tmp"))
        (root / "config").mkdir()
        d = Dockerd(
            root=root,
            env={"PATH": _DAEMON_PATH, "HOME": str(root), "DOCKER_HOST": f"unix://{SOCKET_PATH}",
                 "DOCKER_CONFIG": str(root / "config")},
            cgroup_parent=f"/{root.name}", extra_args=tuple(extra_args),
        )
        try:
            d.start()
            yield d
        except BaseException:
            sys.stderr.write(f"--- dockerd log ({d.log_path}) ---\n{d.log_tail()}\n")
            raise
        finally:
            d.stop()
            unmount_under(root)
            remove_cgroups(d.cgroup_parent)
            shutil.rmtree(root, ignore_errors=True)


def busybox_rootfs_tar(
    dest: Path, extra_dirs: Sequence[str] = (), files: Iterable[tuple[str, bytes]] = ()
) -> Path:
    """A minimal image rootfs tarball for `docker import`: Debian busybox-static's
    /bin/busybox plus a symlink per applet, /etc/passwd, /tmp, and the extra
    directories (relative paths, e.g. "data") and files (path, content) asked for."""
    with tempfile.TemporaryDirectory(prefix="bbroot-") as tmp:
        top = build_rootfs(Path(tmp), extra_dirs, files)
        tmp_tar = dest.with_name(dest.name + ".part")
        with tarfile.open(tmp_tar, "w") as tf:
            for entry in sorted(top.iterdir()):
                tf.add(entry, arcname=entry.name)
        tmp_tar.rename(dest)
    return dest
