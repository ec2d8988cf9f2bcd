"""Fixtures for the volume tests: a private state root, a manager on it, and a real
`strata serve` process (so it can be killed -9 and restarted) with a client; for the
shared volumes, one private Ceph cluster per session and "hosts" (a `strata serve`
each, own state root) against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from benchmarks.ceph import Cluster, running_ceph
from benchmarks.processes import pids_mentioning
from plugin_api.client import PluginClient
from volumes import VolumeConfig, VolumeManager
from volumes.state import remove_tree

STRATA = str(Path(sys.executable).with_name("strata"))


@dataclass
class Env:
    """One private strata installation: state root, config with an allowed bind root."""

    root: Path
    config: Path
    bind_root: Path

    def manager(self) -> VolumeManager:
        return VolumeManager(self.root / "volumes", VolumeConfig.load(self.config))

    def strata(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [STRATA, "--root", str(self.root), *args], capture_output=True, text=True, timeout=120,
            env={**os.environ, "STRATA_VOLUMES_CONFIG": str(self.config)}, input=input,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"strata {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    root = tmp_path / "state"
    bind_root = tmp_path / "allowed"
    bind_root.mkdir()
    config = tmp_path / "volumes.json"
    config.write_text(json.dumps({"bind_roots": [str(bind_root)]}))
    try:
        yield Env(root, config, bind_root)
    finally:
        remove_tree(tmp_path)  # detaches any tmpfs or clone mount a failed test left


@pytest.fixture
def manager(env: Env) -> VolumeManager:
    return env.manager()


class Service:
    """A `strata serve` subprocess on a private socket."""

    def __init__(self, env: Env, sock: Path, spec_dir: Path, name: str = "strata-test") -> None:
        self.env, self.socket, self.spec_dir, self.name = env, sock, spec_dir, name
        self.proc: subprocess.Popen[str] | None = None
        self.log = env.root.parent / "serve.log"

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        """Start and wait for its systemd-style READY=1 (sent once socket and spec file exist)."""
        self.env.root.mkdir(parents=True, exist_ok=True)
        notify_dir = Path(tempfile.mkdtemp(prefix="svn-", dir="/tmp"))
        notify = notify_dir / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns, open(self.log, "a") as log:
            ns.bind(str(notify))
            ns.settimeout(0.1)
            self.proc = subprocess.Popen(
                [STRATA, "--root", str(self.env.root), "serve", "--config", str(self.env.config),
                 "--name", self.name, "--socket", str(self.socket), "--spec-dir", str(self.spec_dir), *extra],
                stdout=log, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    if ns.recv(100) == b"READY=1":
                        break
                except TimeoutError:
                    pass
                if self.proc.poll() is not None:
                    raise AssertionError(f"strata serve exited {self.proc.returncode}: {self.log_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"strata serve did not get ready: {self.log_text()}")
        shutil.rmtree(notify_dir)

    def log_text(self) -> str:
        return self.log.read_text()

    def answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
                return True
            except OSError:
                return False

    def stop(self) -> int:
        """SIGTERM and wait: the clean shutdown path. Returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self.proc = None

    def call(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One protocol call; returns the decoded answer even when it carries Err."""
        status, raw = self.raw(endpoint, b"" if body is None else json.dumps(body).encode() + b"\n")
        assert status == 200, (status, raw)
        out: dict[str, Any] = json.loads(raw)
        return out

    def raw(self, endpoint: str, data: bytes) -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            async with PluginClient(self.address) as c:
                return await c.call_raw(endpoint, data)

        return asyncio.run(go())

    def client(self) -> PluginClient:
        return PluginClient(self.address)


S = TypeVar("S", bound=Service)


@contextlib.contextmanager
def serving(kind: type[S], env: Env, tmp_path: Path) -> Iterator[S]:
    """A started `kind` of service on a socket in a short directory (AF_UNIX paths stop at
    108 bytes); killed and its directory removed afterwards."""
    sock_dir = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    svc = kind(env, sock_dir / "p.sock", tmp_path / "spec")
    try:
        svc.start()
        yield svc
    finally:
        if svc.proc is not None:
            svc.proc.kill()
            svc.proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def service(env: Env, tmp_path: Path) -> Iterator[Service]:
    with serving(Service, env, tmp_path) as svc:
        yield svc


# -- shared volumes on CephFS: one private cluster for the whole session --------------------


@pytest.fixture(scope="session")
def ceph() -> Iterator[Cluster]:
    """A single-node Ceph cluster (benchmarks.ceph), started once for every test that needs
    it and removed afterwards; /strata is the root strata's shared volumes live in."""
    with running_ceph() as c:
        c.make_dir(SHARED_ROOT)
        print(f"\n[ceph] single-node cluster up in {c.started_in:.1f} s", file=sys.__stderr__)
        yield c


SHARED_ROOT = "/strata"
SHARED_TIMEOUT = 5.0


class SharedHost(Service):
    """One "host": a `strata serve` with its own state root serving, besides its local
    plugin, the shared plugin on a socket of its own, against the session's cluster."""

    def __init__(self, top: Path, ceph: Cluster, shared_name: str, **cephfs: Any) -> None:
        top.mkdir(parents=True, exist_ok=True)
        config = top / "volumes.json"
        settings = {**ceph.strata_config(SHARED_ROOT, timeout=SHARED_TIMEOUT), **cephfs}
        config.write_text(json.dumps({"cephfs": settings}))
        env = Env(top / "state", config, top)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))
        super().__init__(env, self.sock_dir / "local.sock", top / "spec", name=f"{shared_name}-local")
        self.shared_name = shared_name
        self.shared_socket = self.sock_dir / "shared.sock"

    def start(self, extra: tuple[str, ...] = ()) -> None:
        super().start(("--shared-name", self.shared_name, "--shared-socket", str(self.shared_socket), *extra))

    @property
    def shared_root(self) -> Path:
        return self.env.root / "shared-volumes"

    def mountpoint(self, name: str) -> Path:
        return self.shared_root / name / "_data"

    def host_record(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads((self.shared_root / name / "host.json").read_text())
        return out

    def scall(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call to the shared plugin; the decoded answer, Err included."""
        async def go() -> tuple[int, bytes]:
            async with PluginClient(f"unix://{self.shared_socket}") as c:
                return await c.call_raw(endpoint, b"" if body is None else json.dumps(body).encode())

        status, raw = asyncio.run(go())
        assert status == 200, (status, raw)
        out: dict[str, Any] = json.loads(raw)
        return out

    def ok(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        out = self.scall(endpoint, body)
        assert "Err" not in out, (endpoint, body, out)
        return out

    def close(self) -> None:
        """Stop the service and end every mount under the host (volumes and control mount:
        detached, so each ceph-fuse closes its session). A service stuck in a call into a
        mount of a cluster that stopped answering cannot die until that call returns: then
        the host's ceph-fuse daemons (their command lines name its state root) are killed."""
        if self.proc is not None:
            self.proc.kill()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                for pid in pids_mentioning(str(self.env.root)):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        remove_tree(self.env.root.parent)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def make_host(ceph: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SharedHost]]:
    """Start hosts on demand (`make_host("a")`); all are stopped and unmounted afterwards."""
    hosts: list[SharedHost] = []

    def make(label: str, shared_name: str = "strata-shared-test", **cephfs: Any) -> SharedHost:
        h = SharedHost(tmp_path_factory.mktemp(f"host-{label}"), ceph, shared_name, **cephfs)
        hosts.append(h)
        h.start()
        return h

    try:
        yield make
    finally:
        for h in hosts:
            h.close()
