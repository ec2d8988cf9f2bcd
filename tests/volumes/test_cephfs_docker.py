"""A shared volume across two hosts through a real Docker Engine: host A's dockerd
creates it and a container there writes into it; then a fresh dockerd (another data
root: a second host's Docker, as only one dockerd may run on this machine at a time)
pointed at host B's plugin lists it, a container there reads the data, and removing
it is refused while host A still has it mounted."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.dockerd import Dockerd, busybox_rootfs_tar, running_dockerd
from plugin_api.protocol import SPEC_DIR

from .conftest import SharedHost

PLUGIN = "stratatest-shared"
IMAGE = "strata-bb:shared"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def hosts(make_host: Callable[..., SharedHost]) -> tuple[SharedHost, SharedHost]:
    return make_host("docker-a", PLUGIN), make_host("docker-b", PLUGIN)


@contextlib.contextmanager
def docker_on(host: SharedHost, tar: Path) -> Iterator[Dockerd]:
    """A fresh dockerd that finds PLUGIN at this host's shared socket (through the spec
    file the host's service wrote in its private spec dir, copied where Docker looks)."""
    spec = SPEC_DIR / f"{PLUGIN}.spec"
    SPEC_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(host.spec_dir / f"{PLUGIN}.spec", spec)
    try:
        with running_dockerd() as d:
            d.docker("import", str(tar), IMAGE)
            yield d
    finally:
        spec.unlink(missing_ok=True)


def test_created_on_host_a_read_on_host_b(hosts: tuple[SharedHost, SharedHost], tmp_path: Path) -> None:
    a, b = hosts
    tar = busybox_rootfs_tar(tmp_path / "rootfs.tar", extra_dirs=["data"])
    with docker_on(a, tar) as d:
        d.docker("volume", "create", "-d", PLUGIN, "-o", "size=16m", "web")
        info = json.loads(d.docker("volume", "inspect", "web").stdout)[0]
        assert info["Driver"] == PLUGIN and info["Scope"] == "global"
        assert info["Status"]["Type"] == "cephfs" and info["Status"]["SizeLimit"] == 16 << 20
        d.docker("run", "--rm", "-v", "web:/data", IMAGE, "sh", "-c", "echo written on host a > /data/msg")
        res = d.docker("run", "--rm", "-v", "web:/data", IMAGE, "dd", "if=/dev/zero", "of=/data/big",
                       "bs=1M", "count=64", check=False)
        assert res.returncode != 0 and "Disk quota exceeded" in res.stderr, res.stderr
        d.docker("run", "--rm", "-v", "web:/data", IMAGE, "rm", "/data/big")
    # A container of host A still uses it (driven through the plugin as Docker would).
    a.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "container-on-a"})
    with docker_on(b, tar) as d:
        listed = d.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.splitlines()
        assert f"{PLUGIN} web" in listed
        out = d.docker("run", "--rm", "-v", "web:/data", IMAGE, "cat", "/data/msg").stdout
        assert out == "written on host a\n"
        res = d.docker("volume", "rm", "web", check=False)
        assert res.returncode != 0 and "in use on host(s)" in res.stderr, res.stderr
        a.ok("/VolumeDriver.Unmount", {"Name": "web", "ID": "container-on-a"})
        d.docker("volume", "rm", "web")
    assert "web" not in [v["Name"] for v in a.ok("/VolumeDriver.List")["Volumes"]]
