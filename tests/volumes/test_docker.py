"""The plugin through a real Docker Engine (Debian's docker.io): dockerd started
privately under the machine-wide lock, an image imported from busybox-static,
strata serving on /run/docker/plugins/PLUGIN.sock."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.dockerd import Dockerd, busybox_rootfs_tar, running_dockerd
from common import kernel
from volumes.state import remove_tree

from .conftest import Env, Service

PLUGIN = "stratatest"
IMAGE = "strata-bb:data"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    top = tmp_path_factory.mktemp("dockervol")
    (top / "allowed").mkdir()
    (top / "volumes.json").write_text(json.dumps({"bind_roots": [str(top / "allowed")]}))
    try:
        yield Env(top / "state", top / "volumes.json", top / "allowed")
    finally:
        remove_tree(top)


@pytest.fixture(scope="module")
def service(env: Env) -> Iterator[Service]:
    # Docker finds PLUGIN.sock in /run/docker/plugins by itself: no spec file is written.
    svc = Service(env, Path(f"/run/docker/plugins/{PLUGIN}.sock"), env.root.parent / "spec", name=PLUGIN)
    try:
        svc.start()
        yield svc
    finally:
        if svc.proc is not None:
            svc.stop()


@pytest.fixture(scope="module")
def docker(service: Service, env: Env) -> Iterator[Dockerd]:
    """Set up after (so torn down before) the service: dockerd's last Unmounts still get answers."""
    with running_dockerd() as d:
        tar = busybox_rootfs_tar(env.root.parent / "rootfs.tar", extra_dirs=["data"],
                                 files=[("data/seed", b"from the image\n")])
        d.docker("import", str(tar), IMAGE)
        yield d


def status(service: Service, name: str) -> dict[str, object]:
    out: dict[str, object] = service.call("/VolumeDriver.Get", {"Name": name})["Volume"]["Status"]
    return out


def test_create_ls_inspect(docker: Dockerd, service: Service, env: Env) -> None:
    docker.docker("volume", "create", "-d", PLUGIN, "--label", "k=v", "dv1")
    docker.docker("volume", "create", "-d", PLUGIN, "-o", "type=tmpfs", "-o", "size=4m", "dmem")
    ls = docker.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.split("\n")
    assert f"{PLUGIN} dv1" in ls and f"{PLUGIN} dmem" in ls
    info = json.loads(docker.docker("volume", "inspect", "dv1").stdout)[0]
    assert info["Driver"] == PLUGIN and info["Labels"] == {"k": "v"}
    assert info["Mountpoint"] == str(env.root / "volumes" / "dv1" / "_data")
    assert info["Status"]["Type"] == "local" and info["Status"]["MountCount"] == 0
    assert (env.root / "volumes" / "dv1" / "volume.json").exists()
    res = docker.docker("volume", "create", "-d", PLUGIN, "-o", "colour=red", "bad1", check=False)
    assert res.returncode != 0 and "unknown option 'colour'" in res.stderr


def test_run_copies_image_content_in(docker: Dockerd, env: Env, service: Service) -> None:
    """/data exists in the image: Docker mounts, copies the image's /data in, unmounts, mounts again."""
    out = docker.docker("run", "--rm", "-v", "dv1:/data", IMAGE, "sh", "-c",
                        "cat /data/seed; echo written > /data/new; ls /data").stdout
    assert out.split() == ["from", "the", "image", "new", "seed"]
    data = env.root / "volumes" / "dv1" / "_data"
    assert (data / "seed").read_text() == "from the image\n" and (data / "new").read_text() == "written\n"
    assert status(service, "dv1")["MountCount"] == 0


def test_size_limited_local_volume(docker: Dockerd, env: Env, service: Service) -> None:
    docker.docker("volume", "create", "-d", PLUGIN, "-o", "size=16m", "dquota")
    out = docker.docker("run", "--rm", "-v", "dquota:/data", IMAGE, "sh", "-c",
                        "cat /data/seed; grep ' /data ' /proc/mounts | cut -d' ' -f3;"
                        "dd if=/dev/zero of=/data/fill bs=1M count=32 2>&1 | grep -c 'No space'").stdout
    assert out.split("\n")[:3] == ["from the image", "ext4", "1"]  # copied in; limit enforced
    assert status(service, "dquota")["MountCount"] == 0
    out = docker.docker("run", "--rm", "-v", "dquota:/data", IMAGE, "ls", "/data").stdout
    assert out.split() == ["fill", "seed"]  # kept in the image between mounts
    docker.docker("volume", "rm", "dquota")


def test_run_on_path_missing_from_image_and_tmpfs(docker: Dockerd, service: Service) -> None:
    out = docker.docker("run", "--rm", "-v", "dv2:/fresh", "--volume-driver", PLUGIN, IMAGE, "sh", "-c",
                        "echo hi > /fresh/f && cat /fresh/f && ls /fresh").stdout
    assert out.split() == ["hi", "f"]
    assert status(service, "dv2")["Type"] == "local"  # created through the plugin by `run`
    out = docker.docker("run", "--rm", "-v", "dmem:/m", IMAGE, "sh", "-c",
                        "grep ' /m ' /proc/mounts; df -k /m | tail -1").stdout
    assert "tmpfs" in out and " 4096 " in out
    assert not status(service, "dmem")["Mounted"]


def test_two_containers_share_a_volume_and_rm_in_use(docker: Dockerd, service: Service) -> None:
    docker.docker("run", "-d", "--name", "holder", "-v", "dv1:/data", IMAGE, "sleep", "600")
    try:
        docker.docker("run", "--rm", "-v", "dv1:/data", IMAGE, "sh", "-c", "echo from-b > /data/b")
        out = docker.docker("exec", "holder", "cat", "/data/b").stdout
        assert out == "from-b\n"
        assert status(service, "dv1")["MountCount"] == 1  # the second container has gone
        res = docker.docker("volume", "rm", "dv1", check=False)
        assert res.returncode != 0 and "in use" in res.stderr
        assert "in use" in service.call("/VolumeDriver.Remove", {"Name": "dv1"})["Err"]
    finally:
        docker.docker("rm", "-f", "holder")
    assert status(service, "dv1")["MountCount"] == 0
    docker.docker("volume", "create", "-d", PLUGIN, "unused1")
    docker.docker("volume", "rm", "unused1")
    assert "no such volume" in service.call("/VolumeDriver.Get", {"Name": "unused1"})["Err"]


def test_service_restart_while_container_runs(docker: Dockerd, service: Service) -> None:
    docker.docker("run", "-d", "--name", "runner", "-v", "dv1:/data", IMAGE, "sh", "-c",
                  "while true; do date >> /data/log; sleep 0.2; done")
    try:
        assert status(service, "dv1")["MountCount"] == 1
        service.kill9()
        service.start()
        assert status(service, "dv1")["MountCount"] == 1
        service.stop()
        service.start()
        assert docker.docker("exec", "runner", "sh", "-c", "wc -l < /data/log").stdout.strip() != "0"
        assert status(service, "dv1")["MountCount"] == 1
    finally:
        docker.docker("rm", "-f", "runner")
    assert status(service, "dv1")["MountCount"] == 0  # Docker's Unmount reached the restarted service


def test_clone_volume_in_a_container(docker: Dockerd, service: Service, env: Env) -> None:
    docker.docker("volume", "create", "-d", PLUGIN, "-o", "type=clone", "-o", "from=dv1", "dclone")
    out = docker.docker("run", "--rm", "-v", "dclone:/c", IMAGE, "sh", "-c",
                        "cat /c/seed; echo clone-only > /c/seed; rm /c/new; grep ' /c ' /proc/mounts").stdout
    assert out.startswith("from the image\n") and "fuse" in out
    data = env.root / "volumes" / "dv1" / "_data"
    assert (data / "seed").read_text() == "from the image\n" and (data / "new").exists()  # source untouched
    out = docker.docker("run", "--rm", "-v", "dclone:/c", IMAGE, "sh", "-c", "cat /c/seed; ls /c").stdout
    assert out.split() == ["clone-only", "b", "log", "seed"]
    res = docker.docker("volume", "rm", "dv1", check=False)
    assert res.returncode != 0 and "cloned by dclone" in res.stderr
    docker.docker("volume", "rm", "dclone")


def test_docker_waits_for_a_restarting_service(docker: Dockerd, service: Service) -> None:
    """Docker retries a plugin that is down for about 15 s: a `docker run` issued while the
    service restarts succeeds once it is back."""
    service.stop()
    run = subprocess.Popen(
        [docker.docker_bin, "run", "--pull=never", "--rm", "-v", "dv2:/v", IMAGE, "cat", "/v/f"],
        env=docker.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(2)
    service.start()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert out == "hi\n"


def test_dockerd_restart_keeps_volumes_with_the_plugin(docker: Dockerd, service: Service, env: Env) -> None:
    docker.docker("volume", "create", "-d", PLUGIN, "-o", "type=tmpfs", "survivor")
    docker.docker("run", "-d", "--stop-timeout", "1", "--name", "across", "-v", "dv1:/data", IMAGE,
                  "sleep", "600")
    docker.restart()
    # Docker asked the plugin about its volumes again; none became a local volume.
    drivers = dict(line.split()[::-1] for line in
                   docker.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.splitlines())
    assert drivers["dv1"] == PLUGIN and drivers["survivor"] == PLUGIN and drivers["dmem"] == PLUGIN
    out = docker.docker("run", "--rm", "-v", "dv1:/data", IMAGE, "cat", "/data/seed").stdout
    assert out == "from the image\n"
    assert not (Path(docker.data_root) / "volumes" / "dv1").exists()
    docker.docker("rm", "-f", "across")
    # dockerd stopped the container when it went down; its Unmount released the reference.
    deadline = time.monotonic() + 30
    while status(service, "dv1")["MountCount"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(service, "dv1")["MountCount"] == 0
    for name in ("dv1", "dv2", "dmem", "survivor"):
        docker.docker("volume", "rm", name)
    assert service.call("/VolumeDriver.List", {})["Volumes"] == []
    assert not any(t.startswith(str(env.root)) for _, t, _, _ in kernel.mounts())


def test_reboot_does_not_leave_references_behind(docker: Dockerd, service: Service, env: Env) -> None:
    """A power cut kills Docker and its containers without any Unmount; after the reboot Docker
    mounts again with the container's old mount ID. References from the earlier boot must not
    count, or the volume would stay "in use" for ever."""
    docker.docker("volume", "create", "-d", PLUGIN, "rb")
    docker.docker("run", "-d", "--name", "victim", "-v", "rb:/data", IMAGE, "sleep", "600")
    assert status(service, "rb")["MountCount"] == 1
    docker.crash()
    service.stop()
    # The reboot: the kernel's boot id changes (records remember the one of their references).
    record = env.root / "volumes" / "rb" / "volume.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "Boot": "the-boot-before"}))
    service.start()
    docker.start()
    assert status(service, "rb")["MountCount"] == 0
    docker.docker("start", "victim")
    assert status(service, "rb")["MountCount"] == 1
    docker.docker("rm", "-f", "victim")
    assert status(service, "rb")["MountCount"] == 0
    docker.docker("volume", "rm", "rb")


def test_spec_file_discovery(env: Env, docker: Dockerd, tmp_path: Path) -> None:
    """A socket outside /run/docker/plugins is found through /etc/docker/plugins/NAME.spec."""
    name = "stratatestspec"
    svc = Service(env, tmp_path / "s.sock", Path("/etc/docker/plugins"), name=name)
    spec = Path(f"/etc/docker/plugins/{name}.spec")
    try:
        svc.start()
        assert spec.read_text() == f"unix://{svc.socket}\n"
        docker.docker("volume", "create", "-d", name, "specvol")
        docker.docker("run", "--rm", "-v", "specvol:/s", IMAGE, "touch", "/s/x")
        assert (env.root / "volumes" / "specvol" / "_data" / "x").exists()
        docker.docker("volume", "rm", "specvol")
    finally:
        if svc.proc is not None:
            svc.stop()
        subprocess.run(["rm", "-f", str(spec)], check=False)
