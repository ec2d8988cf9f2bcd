"""Fixtures for the runtime tests: a busybox image in a private state root, and the real
`strata` CLI run as a subprocess inside a network namespace made for the session (so the
bridge, veths and published ports never touch the host's network). After every test,
everything its containers used must be gone: mounts, veths, cgroups, processes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtime import cgroups
from tests.support.dockerd import busybox_rootfs_tar
from unionfs.kernel import mounts

STRATA = str(Path(sys.executable).with_name("strata"))
IMAGE = "busybox:test"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} missing: run `make deps` (Debian packages) first")
    return path


@dataclass
class Strata:
    root: Path
    netns: str
    seen: set[str] = field(default_factory=set)

    def cmd(self, *args: str) -> list[str]:
        return [_need("nsenter"), f"--net=/run/netns/{self.netns}", STRATA, "--root", str(self.root), *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout, input=input,
                             env={**os.environ, **(env or {})})
        if check and res.returncode != 0:
            raise AssertionError(f"strata {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res

    def inspect(self, ref: str) -> dict[str, Any]:
        rec = json.loads(self("inspect", ref).stdout)[0]
        self.seen.add(rec["Id"])
        return dict(rec)

    def run_d(self, *args: str, env: dict[str, str] | None = None) -> str:
        cid = self("run", "-d", *args, env=env).stdout.strip()
        self.seen.add(cid)
        return cid

    def in_netns(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A host command in the test's network namespace (a client of a published port)."""
        return subprocess.run([_need("nsenter"), f"--net=/run/netns/{self.netns}", *argv],
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def netns() -> Iterator[str]:
    name = f"strata-rt-{secrets.token_hex(4)}"
    subprocess.run([_need("ip"), "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="session")
def state_root(tmp_path_factory: pytest.TempPathFactory, netns: str) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("runtime")
    root = base / "state"
    tar = busybox_rootfs_tar(base / "busybox.tar", extra_dirs=["data"],
                             files=[("etc/motd", b"image motd\n")])
    s = Strata(root, netns)
    s("import", str(tar), IMAGE)
    yield root


def _leftovers(root: Path, netns: str, ids: set[str]) -> list[str]:
    found = [f"mount {t}" for _, t, _, _ in mounts() if t.startswith(str(root) + "/")]
    links = subprocess.run(["ip", "netns", "exec", netns, "ip", "-o", "link"], capture_output=True,
                           text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
              if ": vs" in line or ": strata0" in line]
    for cg in cgroups.leftovers():
        if cg.name in ids:
            found.append(f"cgroup {cg.version} {cg.name}")
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [f"process {p}" for p in procs.splitlines() if str(root) in p]
    return found


@pytest.fixture
def strata(state_root: Path, netns: str) -> Iterator[Strata]:
    s = Strata(state_root, netns)
    try:
        yield s
    finally:
        ids = set(s.seen)
        listed = s("ps", "-a", "--format", "json", check=False)
        for line in json.loads(listed.stdout) if listed.returncode == 0 else []:
            ids.add(line["ID"])
            s("rm", "-f", line["ID"], check=False)
        s("system", "prune", check=False)
        deadline = time.monotonic() + 10
        left = _leftovers(state_root, netns, ids)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _leftovers(state_root, netns, ids)
        assert not left, f"left behind: {left}"
