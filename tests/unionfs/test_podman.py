"""strata-unionfs as podman's mount_program: the real client, end to end.

podman (Debian 4.3) mounts every container rootfs through the mount program,
writes image layers with `.wh.` whiteouts (which strata must read), and reads
the upper dir directly for `diff` and `commit`.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dockerd import busybox_rootfs_tar

from .support import STRATA, unmount

IMAGE = "localhost/strata-test/busybox:1"


class Podman:
    def __init__(self, root: Path) -> None:
        self.root = root
        graph, run = root / "graph", root / "run"
        storage = root / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\nrunroot = "{run}"\n'
            f'[storage.options.overlay]\nmount_program = "{STRATA}"\n'
        )
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf = root / "containers.conf"
        conf.write_text(
            '[containers]\nnetns = "none"\n'
            f'default_ulimits = ["nofile={hard}:{hard}", "nproc=4096:4096"]\n'
            '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
        )
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage), "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=180)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def reset(self) -> None:
        self("rm", "--all", "--force", "--time", "0", check=False)
        self("rmi", "--all", "--force", check=False)
        with open("/proc/self/mounts") as f:
            targets = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(self.root))]
        for t in sorted(targets, reverse=True):
            unmount(Path(t))


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: `make test` installs Debian's podman")
    p = Podman(tmp_path)
    try:
        busybox_rootfs_tar(tmp_path / "rootfs.tar", extra_dirs=["data"], files=[("etc/motd", b"hello\n")])
        p("import", "--quiet", str(tmp_path / "rootfs.tar"), IMAGE)
        yield p
    finally:
        with contextlib.suppress(Exception):
            p.reset()


def test_podman_runs_containers_on_strata(podman: Podman) -> None:
    out = podman("run", "--rm", IMAGE, "sh", "-c", "echo hi > /tmp/x && cat /tmp/x /etc/motd")
    assert out == "hi\nhello\n"
    cid = podman("run", "-d", IMAGE, "sleep", "60").strip()
    try:
        deadline = time.monotonic() + 30
        mounts: list[str] = []
        while not mounts and time.monotonic() < deadline:
            with open("/proc/self/mounts") as f:
                mounts = [ln for ln in f if "fuse.strata-unionfs" in ln and str(podman.root) in ln]
            time.sleep(0.1)
        assert mounts, "the running container's rootfs is not a strata-unionfs mount"
    finally:
        podman("rm", "--force", "--time", "0", cid)


def test_podman_diff_commit_and_whiteouts_in_image_layers(podman: Podman) -> None:
    script = "rm /etc/motd && rm -r /data && mkdir /data && echo new > /data/f && echo x > /added"
    podman("run", "--name", "c1", IMAGE, "sh", "-c", script)
    diff = set(podman("diff", "c1").split("\n"))
    assert {"D /etc/motd", "A /added", "A /data/f"} <= diff, diff
    podman("commit", "--quiet", "c1", "localhost/strata-test/child:1")
    # The committed layer carries `.wh.` whiteouts, which strata-unionfs reads as a lower.
    out = podman("run", "--rm", "localhost/strata-test/child:1", "sh", "-c",
                 "test ! -e /etc/motd && cat /data/f /added && ls /data")
    assert out == "new\nx\nf\n"
