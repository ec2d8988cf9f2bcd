"""strata as Docker Engine's storage driver: Debian's dockerd 20.10 started with
`--experimental --storage-driver PLUGIN` (under the machine-wide lock, benchmarks.dockerd)
on a real `strata serve` at /run/docker/plugins/PLUGIN.sock. Every image layer and
container root lives in strata's layer store; a container's / is a strata-unionfs mount."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.dockerd import Dockerd, busybox_rootfs_tar, running_dockerd
from common import kernel
from tests.store.helpers import TarBuilder
from tests.store.registry import running_registry
from volumes.state import remove_tree

from .conftest import Env, GraphService

PLUGIN = "stratagraphtest"
IMAGE = "strata-bb:graph"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    top = tmp_path_factory.mktemp("dockergraph")
    (top / "volumes.json").write_text("{}")
    try:
        yield Env(top / "state", top / "volumes.json", top)
    finally:
        remove_tree(top)


@pytest.fixture(scope="module")
def service(env: Env) -> Iterator[GraphService]:
    svc = GraphService(env, Path(f"/run/docker/plugins/{PLUGIN}.sock"), env.root.parent / "spec", name=PLUGIN)
    try:
        svc.start(("--debug",))  # the request log documents what dockerd sends
        yield svc
    finally:
        if svc.proc is not None:
            svc.stop()


@pytest.fixture(scope="module")
def docker(service: GraphService, env: Env) -> Iterator[Dockerd]:
    """Set up after (so torn down before) the service: dockerd's last Puts still get answers."""
    with running_dockerd(["--experimental", "--storage-driver", PLUGIN]) as d:
        tar = busybox_rootfs_tar(env.root.parent / "rootfs.tar", extra_dirs=["data"],
                                 files=[("etc/motd", b"from the image\n")])
        d.docker("import", str(tar), IMAGE)
        yield d


def _store_mounts(service: GraphService) -> list[tuple[str, str]]:
    top = str(service.layers) + "/"
    return [(tgt, kind) for _, tgt, kind, _ in kernel.mounts() if tgt.startswith(top)]


def _mentions(proc: Path, needle: str) -> bool:
    try:
        return needle.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def _layers(docker: Dockerd, image: str) -> list[str]:
    out: list[str] = json.loads(docker.docker("inspect", "--format", "{{json .RootFS.Layers}}", image).stdout)
    return out


def test_info_and_run(docker: Dockerd, service: GraphService) -> None:
    info = json.loads(docker.docker("info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == PLUGIN
    assert dict(info["DriverStatus"])["Union"] == "strata-unionfs"
    out = docker.docker("run", "--rm", IMAGE, "sh", "-c", "cat /etc/motd; grep ' / / ' /proc/self/mountinfo")
    motd, root_line = out.stdout.splitlines()
    assert motd == "from the image"
    assert " - fuse.strata-unionfs strata-unionfs " in root_line
    cid = docker.docker("run", "-d", IMAGE, "sleep", "300").stdout.strip()
    try:
        merged = docker.docker("inspect", "--format", "{{.GraphDriver.Data.MergedDir}}", cid).stdout.strip()
        assert merged.startswith(str(service.layers))
        assert (merged, "fuse.strata-unionfs") in _store_mounts(service)
    finally:
        docker.docker("rm", "-f", cid)
    assert _store_mounts(service) == []  # the last Put unmounted it


def test_commit_diff_export(docker: Dockerd, tmp_path: Path) -> None:
    docker.docker("run", "--name", "changer", IMAGE, "sh", "-c",
                  "echo new > /data/new; rm /etc/motd; echo x > /etc/passwd")
    try:
        diff = set(docker.docker("diff", "changer").stdout.splitlines())
        assert {"A /data/new", "D /etc/motd", "C /etc/passwd", "C /etc", "C /data"} <= diff
        # `ps -s` asks DiffSize: the container's own files, "new\n" and "x\n".
        size = docker.docker("ps", "-a", "-s", "--filter", "name=changer", "--format", "{{.Size}}").stdout
        assert size.startswith("6B "), size
        docker.docker("commit", "changer", "strata-bb:committed")
        out = docker.docker("run", "--rm", "strata-bb:committed", "sh", "-c",
                            "cat /data/new /etc/passwd; ls /etc/motd 2>&1 || true").stdout
        assert out.splitlines()[:2] == ["new", "x"] and "No such file" in out
        docker.docker("export", "-o", str(tmp_path / "fs.tar"), "changer")
        with tarfile.open(tmp_path / "fs.tar") as tf:
            names = set(tf.getnames())
            assert "data/new" in names and "bin/busybox" in names and "etc/motd" not in names
            assert tf.extractfile("etc/passwd").read() == b"x\n"  # type: ignore[union-attr]
    finally:
        docker.docker("rm", "-f", "changer")
        docker.docker("rmi", "strata-bb:committed", check=False)


def test_save_load_keeps_the_image_id(docker: Dockerd, tmp_path: Path) -> None:
    docker.docker("run", "--name", "saver", IMAGE, "sh", "-c", "echo saved > /saved")
    docker.docker("commit", "saver", "strata-bb:saved")
    docker.docker("rm", "saver")
    image_id = docker.docker("inspect", "--format", "{{.Id}}", "strata-bb:saved").stdout.strip()
    docker.docker("save", "-o", str(tmp_path / "img.tar"), "strata-bb:saved")
    docker.docker("rmi", "strata-bb:saved")
    # Loaded over the same base layer, and then with every layer new.
    assert "Loaded image: strata-bb:saved" in docker.docker("load", "-i", str(tmp_path / "img.tar")).stdout
    assert docker.docker("inspect", "--format", "{{.Id}}", "strata-bb:saved").stdout.strip() == image_id
    assert docker.docker("run", "--rm", "strata-bb:saved", "cat", "/saved").stdout == "saved\n"
    docker.docker("rmi", "strata-bb:saved")


def test_classic_build(docker: Dockerd, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN echo one > /one\nRUN cat /one /etc/motd > /two\n")
    res = subprocess.run([docker.docker_bin, "build", "-t", "strata-bb:built", str(ctx)], timeout=300,
                         env={**docker.env, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    try:
        out = docker.docker("run", "--rm", "strata-bb:built", "cat", "/two").stdout
        assert out == "one\nfrom the image\n"
        assert len(_layers(docker, "strata-bb:built")) == 3
    finally:
        docker.docker("rmi", "strata-bb:built", check=False)
        docker.docker("image", "prune", "-f")


def test_push_and_pull_through_a_registry(docker: Dockerd) -> None:
    with running_registry() as reg:
        ref = f"{reg.host}/strata/bb:graph"
        docker.docker("tag", IMAGE, ref)
        docker.docker("push", ref, timeout=300)
        diff_ids = _layers(docker, IMAGE)
        docker.docker("rmi", ref)
        docker.docker("rmi", IMAGE)  # the layers go: the pull must bring them back
        try:
            docker.docker("pull", ref, timeout=300)
            assert _layers(docker, ref) == diff_ids
            assert docker.docker("run", "--rm", ref, "cat", "/etc/motd").stdout == "from the image\n"
        finally:
            docker.docker("tag", ref, IMAGE)
            docker.docker("rmi", ref)


def _docker_archive(dest: Path, layer: bytes, tag: str) -> Path:
    """A one-layer `docker save` archive (manifest.json, config, layer.tar) around any tar."""
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": ["l1/layer.tar"]}]).encode()
    with tarfile.open(dest, "w") as tf:
        for name, data in (("manifest.json", manifest), (config_name, config), ("l1/layer.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return dest


def test_hostile_layer_in_docker_load_refused(docker: Dockerd, service: GraphService, tmp_path: Path) -> None:
    """dockerd hands the layer tar to the plugin unchecked: strata refuses it, dockerd removes
    the empty layer, nothing lands outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    before = sorted(os.listdir(service.layers))
    attacks = {
        "dotdot": TarBuilder().file("../../../../../../../../escape", b"x").bytes(),
        "symlink": TarBuilder().symlink("link", str(outside)).file("link/planted", b"x").bytes(),
    }
    for name, layer in attacks.items():
        archive = _docker_archive(tmp_path / f"{name}.tar", layer, f"strata-evil:{name}")
        res = docker.docker("load", "-i", str(archive), check=False)
        assert res.returncode != 0 and "layer refused" in res.stderr, res.stderr
    assert os.listdir(outside) == [] and not Path("/escape").exists()
    assert sorted(os.listdir(service.layers)) == before
    assert "strata-evil" not in docker.docker("images").stdout


def test_dockerd_restart_with_a_stopped_container(docker: Dockerd) -> None:
    docker.docker("run", "--name", "again", IMAGE, "sh", "-c", "echo run >> /runs; cat /runs")
    try:
        docker.restart()
        assert docker.docker("start", "-a", "again").stdout == "run\nrun\n"
    finally:
        docker.docker("rm", "-f", "again")


def test_power_cut_of_docker_under_a_running_container(docker: Dockerd, service: GraphService) -> None:
    """dockerd, containerd and the container killed at once: at its restart dockerd finds the
    container dead and Puts its layer; the union is unmounted and the container starts again."""
    cid = docker.docker("run", "-d", "--name", "cut", IMAGE, "sh", "-c", "echo up >> /ups; sleep 300").stdout
    cid = cid.strip()
    try:
        layer_id = Path(docker.docker("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", cid)
                        .stdout.strip()).parent.name
        assert service.record(layer_id)["refs"] == 1
        docker.crash()
        docker.start()
        assert service.record(layer_id)["refs"] == 0 and _store_mounts(service) == []
        docker.docker("start", cid)
        assert docker.docker("exec", cid, "cat", "/ups").stdout == "up\nup\n"
        assert service.record(layer_id)["refs"] == 1
    finally:
        docker.docker("rm", "-f", "cut")


def test_kill9_of_the_service_under_a_running_container(docker: Dockerd, service: GraphService) -> None:
    cid = docker.docker("run", "-d", "--name", "survivor", IMAGE, "sleep", "300").stdout.strip()
    try:
        layer = docker.docker("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}", cid).stdout.strip()
        pid = int(docker.docker("inspect", "--format", "{{.State.Pid}}", cid).stdout)
        layer_id = Path(layer).parent.name
        assert service.record(layer_id)["refs"] == 1
        service.kill9()
        # The container's root (the union's own daemon) outlives the service; dockerd itself
        # cannot ask anything meanwhile (even `docker exec` asks GetMetadata).
        container_root = Path(f"/proc/{pid}/root")
        (container_root / "proof").write_text("alive\n")
        assert (container_root / "etc" / "motd").read_text() == "from the image\n"
        service.start(("--debug",))
        assert service.record(layer_id)["refs"] == 1
        assert docker.docker("exec", cid, "cat", "/proof").stdout == "alive\n"
        docker.docker("stop", "-t", "1", cid)
        assert service.record(layer_id)["refs"] == 0 and _store_mounts(service) == []
        docker.docker("start", cid)
        assert docker.docker("exec", cid, "cat", "/proof").stdout == "alive\n"
    finally:
        if service.proc is None:
            service.start(("--debug",))
        docker.docker("rm", "-f", "survivor")


def test_rm_and_rmi_leave_nothing_behind(docker: Dockerd, service: GraphService) -> None:
    """Last: every container and image removed, the store holds no layer and no mount."""
    for cid in docker.docker("ps", "-aq").stdout.split():
        docker.docker("rm", "-f", cid)
    for image in docker.docker("images", "-q").stdout.split():
        docker.docker("rmi", "-f", image)
    assert os.listdir(service.layers) == []
    assert _store_mounts(service) == []
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _mentions(p, str(service.layers))]
    status = json.loads(docker.docker("info", "--format", "{{json .DriverStatus}}").stdout)
    assert ["Layers", "0"] in status
    # Put back for anything run after (the module's dockerd outlives this test).
    docker.docker("import", str(service.env.root.parent / "rootfs.tar"), IMAGE)
