"""A private, throw-away containerd (Debian's 1.6.20) with strata as a proxy snapshotter,
for the snapshotter's tests and benchmark (benchmarks never import tests).

Everything lives in one temp dir: containerd's root, state, sockets, config and log, and
the snapshotter's state root and socket. The machine's own containerd (and dockerd's) is
never touched: another socket, another root, and a namespace of our own, so shims,
cgroups (`/<namespace>/<id>`) and processes are ours to find and remove.

    with running_snapshotter() as snap, running_containerd(snap.address) as c:
        c.ctr("images", "import", "--snapshotter", "strata", "image.tar")
        c.ctr("run", "--rm", "--snapshotter", "strata", "docker.io/library/bb:1", "t1", "echo", "hi")
        snap.kill9(); snap.start()          # the snapshotter dies under a running container

Teardown always happens: every task killed and deleted, every container deleted, containerd
stopped, leftover shims and container processes killed by pid, mounts below the dir
unmounted, the namespace's cgroups removed, the dir deleted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import StrataError
from images.formats import save_archive_file
from images.store import Store
from runtime.busybox import build_rootfs

from . import processes
from .dockerd import pids_in_cgroups, remove_cgroups, unmount_under

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
STRATA = str(Path(sys.executable).with_name("strata"))
SNAPSHOTTER = "strata"
# systemd's default PATH, which containerd.service runs with: the mount helper mount.fuse3
# (run by containerd and its shims) finds strata-unionfs in /usr/local/sbin through it.
DAEMON_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_START_TIMEOUT = 60.0


class ContainerdError(RuntimeError):
    """containerd, the snapshotter or a ctr call failed (the message says how)."""


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not _answers(path):
        if proc.poll() is not None:
            raise ContainerdError(f"{what} exited with {proc.returncode}: {processes.log_tail(log, 30)}")
        if time.monotonic() > deadline:
            raise ContainerdError(f"{what} did not listen on {path} within {_START_TIMEOUT:.0f}s: "
                                  f"{processes.log_tail(log, 30)}")
        time.sleep(0.05)


@dataclass
class Snapshotter:
    """`strata snapshotter` on a private state root (its snapshots in root/snapshotter)."""

    root: Path
    address: Path
    log: Path
    premount: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [STRATA, "snapshotter", "--root", str(self.root), "--address", str(self.address),
                *(["--premount"] if self.premount else [])]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_for(self.address, self.proc, "strata snapshotter", self.log)

    def stop(self) -> None:
        processes.stop(self.proc, 30)
        self.proc = None

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log_tail(self) -> str:
        return processes.log_tail(self.log, 30)


@contextlib.contextmanager
def running_snapshotter(dir: Path | None = None, *, premount: bool = False) -> Iterator[Snapshotter]:
    """`strata snapshotter --root DIR/state --address DIR/snapshotter.sock [--premount]` (DIR:
    a fresh temp dir, short enough for a socket path, removed afterwards), stopped afterwards."""
    made = dir is None
    d = Path(tempfile.mkdtemp(prefix="strata-snap-", dir="/var/tmp")) if dir is None else dir
    d.mkdir(parents=True, exist_ok=True)
    snap = Snapshotter(d / "state", d / "snapshotter.sock", d / "snapshotter.log", premount)
    try:
        snap.start()
        yield snap
    except BaseException:
        sys.stderr.write(f"--- snapshotter log ({snap.log}) ---\n{snap.log_tail()}\n")
        raise
    finally:
        snap.stop()
        if made:
            unmount_under(d)
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class Containerd:
    dir: Path
    namespace: str
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=lambda: {"PATH": DAEMON_PATH})
    _leases: int = 0

    @property
    def address(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    def ctr(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`ctr --address SOCK --namespace NS ARGS...`; raises with stderr when check fails."""
        argv = [CTR, "--address", str(self.address), "--namespace", self.namespace, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise ContainerdError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def run(self, image: str, cid: str, *cmd: str, flags: Sequence[str] = ("--rm",),
            snapshotter: str = SNAPSHOTTER, attempts: int = 3) -> subprocess.CompletedProcess[str]:
        """`ctr run FLAGS --snapshotter S IMAGE CID CMD...`, tried again (up to `attempts`,
        the container deleted in between) only when containerd 1.6's shim
        lost its mount helper's exit status to its own child reaper (containerd issue #4387:
        "mount helper ... failed with ECHILD (retired 10 times)"), which happens now and then
        on a busy machine to any fuse3.* snapshotter; any other failure raises at once."""
        args = ("run", *flags, "--snapshotter", snapshotter, image, cid, *cmd)
        for attempt in range(1, attempts + 1):
            res = self.ctr(*args, check=False)
            if res.returncode == 0:
                return res
            if "failed with ECHILD" not in res.stderr or attempt == attempts:
                raise ContainerdError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
            self.ctr("containers", "delete", cid, check=False)
        raise AssertionError("unreachable")

    def collect_garbage(self) -> None:
        """A synchronous run of containerd's garbage collector (deleting a lease with
        --sync): every snapshot containerd no longer references is removed from its
        snapshotter before this returns."""
        self._leases += 1
        lease = f"strata-gc-{self._leases}"
        self.ctr("leases", "create", "--id", lease)
        self.ctr("leases", "delete", "--sync", lease)

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([CONTAINERD, "--config", str(self.dir / "config.toml")], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True)
        _wait_for(self.address, self.proc, "containerd", self.log)

    def remove_all_containers(self) -> None:
        """Kill and delete every task, then every container, of our namespace."""
        if self.proc is None or self.proc.poll() is not None:
            return
        tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
        for t in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", t, check=False)
        for t in tasks:
            for _ in range(50):
                if self.ctr("tasks", "delete", t, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        for c in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "delete", c, check=False)

    def stop(self) -> None:
        processes.stop(self.proc, 30)
        self.proc = None

    def log_tail(self) -> str:
        return processes.log_tail(self.log, 30)


def config(dir: Path, proxies: Mapping[str, Path]) -> str:
    """containerd's config: everything below dir, the proxy snapshotters (name: socket)."""
    plugins = "".join(f'  [proxy_plugins."{name}"]\n    type = "snapshot"\n    address = "{address}"\n'
                      for name, address in proxies.items())
    return f"""version = 2
root = "{dir / 'root'}"
state = "{dir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{dir / 'containerd.sock'}"
[ttrpc]
  address = "{dir / 'containerd.sock.ttrpc'}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{dir / 'opt'}"

[proxy_plugins]
{plugins}"""


@contextlib.contextmanager
def running_containerd(snapshotter_address: Path, dir: Path | None = None, *,
                       more: Mapping[str, Path] | None = None) -> Iterator[Containerd]:
    """A private containerd using the snapshotter at snapshotter_address as `strata` (and
    those in `more`, name: socket, under their names)."""
    made = dir is None
    d = Path(tempfile.mkdtemp(prefix="strata-ctrd-", dir="/var/tmp")) if dir is None else dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.toml").write_text(config(d, {SNAPSHOTTER: snapshotter_address, **(more or {})}))
    # containerd's namespace rule: alphanumerics joined by single '.', '_' or '-'.
    c = Containerd(d, namespace=f"strata-{secrets.token_hex(4)}")
    try:
        c.start()
        yield c
    except BaseException:
        sys.stderr.write(f"--- containerd log ({c.log}) ---\n{c.log_tail()}\n")
        raise
    finally:
        try:
            c.remove_all_containers()
        finally:
            c.stop()
            processes.kill_all(set(processes.pids_mentioning(str(c.address)))
                               | set(pids_in_cgroups(f"/{c.namespace}")))
            unmount_under(d)
            remove_cgroups(f"/{c.namespace}")
            if made:
                shutil.rmtree(d, ignore_errors=True)


def image_archive(dest: Path, tag: str, layers: int = 1) -> Path:
    """A docker-save archive (as `strata save` writes it) of a busybox image of `layers`
    layers: busybox at the bottom; the second layer deletes /bin/vi (a whiteout) and adds
    /etc/motd; each layer N above the first adds /layers/N ("layer N")."""
    if layers < 1:
        raise StrataError("an image needs at least one layer")
    with tempfile.TemporaryDirectory(prefix="strata-image-", dir=dest.parent) as tmp:
        work = Path(tmp)
        store = Store(work / "store")
        image = store.import_rootfs(build_rootfs(work / "rootfs"), None)
        for n in range(2, layers + 1):
            upper = work / f"upper{n}"
            (upper / "layers").mkdir(parents=True)
            (upper / "layers" / str(n)).write_text(f"layer {n}\n")
            if n == 2:
                (upper / "bin").mkdir()
                os.mknod(upper / "bin" / "vi", 0o600 | stat.S_IFCHR, os.makedev(0, 0))
                (upper / "etc").mkdir()
                (upper / "etc" / "motd").write_text("strata\n")
            image = store.commit(image, upper, created_by=f"layer {n}")
        store.tag(image, tag)
        save_archive_file(store, [tag], dest)
    return dest
