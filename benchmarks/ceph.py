"""A private, throw-away single-node Ceph cluster for the tests and the benchmarks
of the shared (CephFS) volume backend.

Built by hand from Debian 12's packages (ceph-mon, ceph-mgr, ceph-osd, ceph-mds,
ceph-fuse, ceph-common), everything in one temp directory on 127.0.0.1: one
monitor on two free ports (msgr v2 and v1, picked at start and retried when
taken), one manager with its modules off, one OSD on memstore (the data lives in
the OSD's memory: nothing to format, gone with the process), pools of size 1, a
CephFS named ``cephfs`` and one MDS. cephx is on; the admin keyring and a
restricted key for strata (`ceph fs authorize`) are written into the directory.
Memory is turned down for a 2-core machine (MDS cache, memstore size, OSD
memory target). It lives in benchmarks/ for the same reason as dockerd.py: the
benchmarks never import the tests, the tests use this.

Usage::

    with running_ceph() as c:                    # ~15-25 s on the test machine
        c.ceph("fs", "status")                   # the ceph CLI as client.admin
        c.strata_config(root="/strata")          # the "cephfs" section of volumes.json
        c.restart_mds()                          # kill -TERM the MDS and start it again
        c.pause(); c.resume()                    # SIGSTOP / SIGCONT every daemon

Every daemon runs in the foreground (``-f``) as a child of this process, so the
teardown (always, even when the body raises) is: SIGTERM, SIGKILL after 10 s,
unmount whatever ceph-fuse mount is left under the directory, ``rm -rf`` it.
Nothing lands in /etc/ceph, /var/lib/ceph, /var/log/ceph or /run/ceph.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import processes
from .processes import pids_mentioning

FS_NAME = "cephfs"
STRATA_CLIENT = "client.strata"
_CLI_TIMEOUT = 60
_READY_TIMEOUT = 120


class CephError(RuntimeError):
    """The cluster could not be started or a ceph command failed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conf(fsid: str, top: Path, v2: int, v1: int) -> str:
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {top}/$name.keyring
run dir = {top}/run
crash dir = {top}/crash
log file = {top}/log/$name.log
admin socket = {top}/run/$name.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon max pg per osd = 1000
[mon]
mon data = {top}/mon/$name
mgr initial modules =
mon cluster log file = {top}/log/cluster.log
[mgr]
mgr data = {top}/mgr/$cluster-$id
pid file = {top}/run/$name.pid
[osd]
osd data = {top}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 2147483648
osd memory target = 268435456
osd max object name len = 256
osd max object namespace len = 64
pid file = {top}/run/$name.pid
[mds]
mds data = {top}/mds/$cluster-$id
mds cache memory limit = 67108864
pid file = {top}/run/$name.pid
"""


@dataclass
class Cluster:
    """A running cluster: ``top`` holds everything; ``conf`` the ceph.conf of its daemons
    and its admin CLI; ``mon_host`` the monitor addresses a client is given."""

    top: Path
    conf: Path = field(init=False)
    mon_host: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started_in: float = 0.0

    def __post_init__(self) -> None:
        self.conf = self.top / "ceph.conf"

    # -- the CLI ---------------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = _CLI_TIMEOUT, check: bool = True) -> str:
        """One `ceph` CLI call as client.admin; its stdout."""
        res = subprocess.run(
            ["ceph", "-c", str(self.conf), "--connect-timeout", "20", *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise CephError(f"ceph {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def ceph_json(self, *args: str) -> Any:
        return json.loads(self.ceph(*args, "--format", "json"))

    def keyring(self, name: str) -> Path:
        return self.top / f"{name}.keyring"

    def authorize(self, name: str, path: str, perms: str = "rwp") -> Path:
        """A key for `name` restricted to `path` of the filesystem (`ceph fs authorize`),
        written to a keyring of its own; returns the keyring's path."""
        out = self.ceph("fs", "authorize", FS_NAME, name, path, perms)
        self.keyring(name).write_text(out)
        return self.keyring(name)

    def strata_config(self, root: str = "/strata", timeout: float = 10.0) -> dict[str, Any]:
        """The `cephfs` section of a volumes.json pointing strata at this cluster with its
        restricted key (made on first call) and the admin key for evictions."""
        if not self.keyring(STRATA_CLIENT).exists():
            self.authorize(STRATA_CLIENT, root)
        return {
            "monitors": self.mon_host, "fs": FS_NAME, "root": root,
            "client": STRATA_CLIENT, "keyring": str(self.keyring(STRATA_CLIENT)),
            "evict_client": "client.admin", "evict_keyring": str(self.keyring("client.admin")),
            "timeout": str(timeout),
        }

    def make_dir(self, path: str) -> None:
        """mkdir -p in the filesystem, through a short-lived admin ceph-fuse mount."""
        mnt = Path(tempfile.mkdtemp(prefix="mk-", dir=self.top))
        subprocess.run(
            ["ceph-fuse", "-c", str(self.conf), "-n", "client.admin", "--client_fs", FS_NAME,
             "--client_mount_timeout", "30", str(mnt)],
            check=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        try:
            (mnt / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True, timeout=30)
            with contextlib.suppress(OSError):
                mnt.rmdir()

    # -- daemons ---------------------------------------------------------------------------

    def _daemon(self, kind: str, ident: str) -> None:
        log = open(self.top / "log" / f"{kind}.{ident}.stdout", "ab")  # noqa: SIM115
        with log:
            self.procs[f"{kind}.{ident}"] = subprocess.Popen(
                [f"ceph-{kind}", "-f", "-c", str(self.conf), "-i", ident],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def restart_mds(self) -> None:
        """Stop the MDS (SIGTERM; SIGKILL if it is not gone in 10 s: seen here hanging in
        "shutting down rank 0") and start it again; returns once it is active again."""
        try:
            processes.stop(self.procs.pop("mds.a"), 10)
        finally:
            self._daemon("mds", "a")
        self._wait_mds_active()

    def pause(self) -> None:
        """SIGSTOP every daemon: the cluster stops answering, as on a network partition."""
        for p in self.procs.values():
            p.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.procs.values():
            p.send_signal(signal.SIGCONT)

    def _wait_mds_active(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            dump = self.ceph_json("fs", "dump")
            infos = [i for fs in dump.get("filesystems", []) for i in fs["mdsmap"]["info"].values()]
            if any(i.get("state") == "up:active" for i in infos):
                return
            time.sleep(0.5)
        raise CephError(f"the MDS did not become active: {self.log_tail('mds.a')}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.top / "log" / f"{name}.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def _run(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=_CLI_TIMEOUT, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise CephError(f"{what} failed: {res.stderr.strip() or res.stdout.strip()}")


def _bootstrap(c: Cluster) -> None:
    top = c.top
    for sub in ("run", "crash", "log", "mon", "mgr", "osd", "mds"):
        (top / sub).mkdir()
    fsid = str(uuid.uuid4())
    for attempt in range(5):  # the ports are free when picked; another process may take them first
        v2, v1 = _free_port(), _free_port()
        c.mon_host = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        c.conf.write_text(_conf(fsid, top, v2, v1))
        if attempt == 0:
            _run(["ceph-authtool", "--create-keyring", str(top / "mon.keyring"), "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *"], "mon key")
            _run(["ceph-authtool", "--create-keyring", str(c.keyring("client.admin")), "--gen-key",
                  "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mds", "allow *", "--cap", "mgr", "allow *"], "admin key")
            _run(["ceph-authtool", str(top / "mon.keyring"), "--import-keyring",
                  str(c.keyring("client.admin"))], "keyring import")
        shutil.rmtree(top / "mon", ignore_errors=True)
        (top / "mon").mkdir()
        monmap = top / "monmap"
        monmap.unlink(missing_ok=True)
        _run(["monmaptool", "--create", "--addv", "a", c.mon_host, "--fsid", fsid, str(monmap)], "monmaptool")
        _run(["ceph-mon", "-c", str(c.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
              "--keyring", str(top / "mon.keyring")], "ceph-mon --mkfs")
        c._daemon("mon", "a")
        time.sleep(1.0)
        proc = c.procs["mon.a"]
        if proc.poll() is None:
            break
        c.procs.pop("mon.a")
        if "Address already in use" not in (top / "log" / "mon.a.stdout").read_text():
            raise CephError(f"ceph-mon exited {proc.returncode}: {c.log_tail('mon.a')}")
    else:
        raise CephError("no free ports for the monitor after 5 attempts")
    c.ceph("config", "set", "mon", "auth_allow_insecure_global_id_reclaim", "false")

    (top / "mgr" / "ceph-x").mkdir()
    c.keyring("mgr.x").write_text(c.ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr",
                                         "osd", "allow *", "mds", "allow *"))
    c._daemon("mgr", "x")

    osd_uuid = str(uuid.uuid4())
    osd_id = c.ceph("osd", "new", osd_uuid).strip()
    (top / "osd" / f"ceph-{osd_id}").mkdir()
    c.keyring(f"osd.{osd_id}").write_text(c.ceph(
        "auth", "get-or-create", f"osd.{osd_id}", "mon", "allow profile osd", "mgr", "allow profile osd",
        "osd", "allow *"))
    _run(["ceph-osd", "-c", str(c.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], "ceph-osd --mkfs")
    c._daemon("osd", osd_id)

    c.ceph("osd", "pool", "create", "cephfs_metadata", "8")
    c.ceph("osd", "pool", "create", "cephfs_data", "8")
    c.ceph("fs", "new", FS_NAME, "cephfs_metadata", "cephfs_data")
    (top / "mds" / "ceph-a").mkdir()
    c.keyring("mds.a").write_text(c.ceph("auth", "get-or-create", "mds.a", "mon", "allow profile mds",
                                         "osd", "allow rwx", "mds", "allow", "mgr", "allow profile mds"))
    c._daemon("mds", "a")
    c._wait_mds_active()


@contextlib.contextmanager
def running_ceph(parent: str = "/var/tmp") -> Iterator[Cluster]:
    """Start a cluster in a fresh directory under parent; stop it and remove every trace
    afterwards, whatever happened."""
    top = Path(tempfile.mkdtemp(prefix="strata-ceph-", dir=parent))
    os.chmod(top, 0o700)
    c = Cluster(top)
    t0 = time.monotonic()
    try:
        _bootstrap(c)
        c.started_in = time.monotonic() - t0
        yield c
    finally:
        c.stop()
        _detach_mounts_under(top)
        # ceph-fuse clients of this cluster still trying to close their sessions (their
        # command lines name its keyrings): nothing will answer them any more.
        for pid in pids_mentioning(str(top)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(top, ignore_errors=True)


def _detach_mounts_under(top: Path) -> None:
    prefix = str(top.resolve())
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    for t in sorted(targets, key=len, reverse=True):
        t = t.replace("\\040", " ")
        if t == prefix or t.startswith(prefix + "/"):
            subprocess.run(["umount", "-l", t], check=False, capture_output=True, timeout=30)
