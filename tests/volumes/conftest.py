"""Fixtures for the volume tests: a private state root, a manager on it, and a real
`strata serve` process (so it can be killed -9 and restarted) with a client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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
        self.env.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [STRATA, "--root", str(self.env.root), "serve", "--config", str(self.env.config),
                 "--name", self.name, "--socket", str(self.socket), "--spec-dir", str(self.spec_dir), *extra],
                stdout=log, stderr=subprocess.STDOUT, text=True,
            )
        deadline = time.monotonic() + 30
        while not self.answers():
            if self.proc.poll() is not None:
                raise AssertionError(f"strata serve exited {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"strata serve did not listen: {self.log.read_text()}")
            time.sleep(0.05)

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


@pytest.fixture
def service(env: Env, tmp_path: Path) -> Iterator[Service]:
    # A short directory for the socket: AF_UNIX paths stop at 108 bytes.
    sock_dir = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    svc = Service(env, sock_dir / "p.sock", tmp_path / "spec")
    try:
        svc.start()
        yield svc
    finally:
        if svc.proc is not None:
            svc.proc.kill()
            svc.proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
