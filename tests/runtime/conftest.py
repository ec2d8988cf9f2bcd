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

from common.kernel import mounts
from runtime import cgroups
from tests.support.dockerd import busybox_rootfs_tar

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


KEYCTL_PROBE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {  /* KEYCTL_GET_KEYRING_ID of the session keyring, created if missing */
    if (syscall(SYS_keyctl, 0, -3, 1) < 0) { printf("keyctl: %s\n", strerror(errno)); return 1; }
    return 0;
}
"""
PROBE_IMAGE = "probe:test"


@pytest.fixture(scope="session")
def probe_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox rootfs tar with /probe/keyctl, a static program making one keyctl(2) call
    (busybox has no keyctl); `cp /probe/keyctl /tmp/k; chmod +x /tmp/k; /tmp/k` runs it."""
    base = tmp_path_factory.mktemp("probe")
    (base / "keyctl.c").write_text(KEYCTL_PROBE_C)
    subprocess.run([_need("gcc"), "-static", "-O2", "-o", str(base / "keyctl"), str(base / "keyctl.c")],
                   check=True, capture_output=True)
    return busybox_rootfs_tar(base / "probe.tar", files=[("probe/keyctl", (base / "keyctl").read_bytes())])


@pytest.fixture(scope="session")
def probe_image(state_root: Path, netns: str, probe_tar: Path) -> str:
    Strata(state_root, netns)("import", str(probe_tar), PROBE_IMAGE)
    return PROBE_IMAGE


@dataclass(frozen=True)
class Loop:
    """A loop device over a small file of the test's; `marker` is written at its start."""

    path: str
    major: int
    minor: int
    marker: str


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Loop]:
    """A host block device for the device-rule tests, detached whatever the test did."""
    backing = tmp_path / "disk.img"
    marker = "STRATA-DISK-" + secrets.token_hex(6).upper()
    with open(backing, "wb") as f:
        f.write(marker.encode().ljust(512, b"\0"))
        f.truncate(4 * 1024 * 1024)
    dev = subprocess.run([_need("losetup"), "-f", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        st = os.stat(dev)
        yield Loop(dev, os.major(st.st_rdev), os.minor(st.st_rdev), marker)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


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
