"""The real-dockerd round trips: docker → strata (a `docker commit`ed multi-layer image,
`docker save`d, loaded by strata, mounted with strata-unionfs, equals `docker export`) and
strata → docker (`strata save` → `docker load` → `docker run`), and both ways through
Debian's docker-registry (strata push → docker pull, docker push → strata pull)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.dockerd import Dockerd, busybox_rootfs_tar, running_dockerd
from images import registry as client
from images.archive import apply_layer
from images.store import Store
from tests.store.helpers import snapshot
from tests.store.registry import running_registry
from tests.unionfs.support import mounted

LAYER2 = (
    "rm -rf /data/sub && rm /data/a && rm -rf /replace-me && mkdir /replace-me && echo new > /replace-me/y"
    " && echo hi > /hello && ln /hello /hello-link && chmod 4755 /hello && chown 12:34 /hello"
    " && rm /etc/file-to-dir && mkdir /etc/file-to-dir && mkfifo /fifo && mknod /null2 c 1 3"
)
LAYER3 = (
    "rm /hello-link && echo more > /data/new && mkdir -p /deep/a/b && echo z > /deep/a/b/z"
    " && ln -s /deep /deeplink && rm -rf /replace-me/y && touch /replace-me/z"
)
# What docker's per-container init layer adds: not part of the image.
_INIT = {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab"}


def _image_view(tree: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """A tree without docker's init layer. Link counts are left out too: /hello keeps a
    second link in the layer below (st_nlink 2 in any overlay view) that `docker export`
    cannot carry once the upper layer removed it."""
    out = {}
    for path, meta in tree.items():
        if path in _INIT or path.startswith(("dev/", "proc/", "sys/")):
            continue
        if path in ("etc", "dev", "proc", "sys"):
            meta = meta[:4] + meta[5:]  # the init layer gives these dirs its own mtime
        out[path] = meta[:-1]
    return out


@pytest.fixture(scope="module")
def docker() -> Iterator[Dockerd]:
    with running_dockerd() as d:
        yield d


def test_docker_to_strata_to_docker(
    store: Store, strata: Callable[..., Any], tmp_path: Path, docker: Dockerd
) -> None:
    rootfs = busybox_rootfs_tar(
        tmp_path / "rootfs.tar",
        extra_dirs=["data/sub", "replace-me"],
        files=[("data/a", b"A"), ("data/sub/b", b"B"), ("replace-me/x", b"x"), ("etc/file-to-dir", b"f")],
    )
    archive, exported = tmp_path / "docker-save.tar", tmp_path / "export.tar"
    back = tmp_path / "strata-save.tar"
    d = docker
    d.docker("import", str(rootfs), "rt:base")
    d.docker("run", "--name", "c1", "rt:base", "sh", "-c", LAYER2)
    d.docker("commit", "c1", "rt:two")
    d.docker("run", "--name", "c2", "rt:two", "sh", "-c", LAYER3)
    d.docker("commit", "-c", "CMD [\"cat\", \"/deep/a/b/z\"]", "c2", "rt:three")
    d.docker("save", "-o", str(archive), "rt:three")
    d.docker("create", "--name", "c3", "rt:three")
    d.docker("export", "-o", str(exported), "c3")
    docker_inspect = json.loads(d.docker("image", "inspect", "rt:three").stdout)[0]

    # docker → strata: the same image, and the same tree through strata-unionfs.
    assert strata("load", "-i", str(archive)).out == "Loaded image: rt:three\n"
    img = store.image(store.resolve("rt:three"))
    assert img.id == docker_inspect["Id"] and len(img.layers) == 3
    assert [x.diff_id for x in img.layers] == docker_inspect["RootFS"]["Layers"]
    with open(exported, "rb") as f:
        apply_layer(f, tmp_path / "exported")
    expected = _image_view(snapshot(tmp_path / "exported"))
    assert "data/a" not in expected and "hello-link" not in expected and "null2" in expected
    lowers = img.lowerdirs
    with mounted("strata", lowers, None, None, tmp_path / "mnt") as m:
        seen = _image_view(snapshot(m))
    differ = {k: (seen.get(k), expected.get(k)) for k in seen.keys() | expected.keys()
              if seen.get(k) != expected.get(k)}
    assert differ == {}

    # strata → docker: what strata saves, docker loads and runs.
    strata("tag", "rt:three", "from-strata/rt:back")
    strata("save", "-o", str(back), "from-strata/rt:back")
    d.docker("rm", "c1", "c2", "c3")
    d.docker("rmi", "rt:three", "rt:two", "rt:base")
    assert "Loaded image: from-strata/rt:back" in d.docker("load", "-i", str(back)).stdout
    assert d.docker("run", "--rm", "from-strata/rt:back").stdout == "z\n"
    listing = d.docker("run", "--rm", "from-strata/rt:back", "ls", "-a", "/data", "/replace-me").stdout
    assert listing.split() == ["/data:", ".", "..", "new", "/replace-me:", ".", "..", "z"]
    loaded = json.loads(d.docker("image", "inspect", "from-strata/rt:back").stdout)[0]
    assert loaded["Id"] == img.id

    # The OCI-layout form (docker 25+ writes it) carries manifest.json too: docker 20.10 loads it.
    strata("save", "--format", "oci", "-o", str(tmp_path / "oci.tar"), "from-strata/rt:back")
    d.docker("rmi", "from-strata/rt:back")
    assert "Loaded image: from-strata/rt:back" in d.docker("load", "-i", str(tmp_path / "oci.tar")).stdout
    assert d.docker("run", "--rm", "from-strata/rt:back").stdout == "z\n"


def test_registry_between_strata_and_docker(
    store: Store, fresh: Store, strata: Callable[..., Any], tmp_path: Path, docker: Dockerd
) -> None:
    """docker pulls what strata pushed; strata pulls what docker pushed (127.0.0.1 registries
    are plain HTTP for docker without configuration)."""
    rootfs = busybox_rootfs_tar(tmp_path / "rootfs.tar", files=[("etc/flavour", b"strata\n")])
    with running_registry() as reg:
        ours, theirs = f"{reg.host}/strata/bb:1", f"{reg.host}/docker/bb:2"
        strata("import", str(rootfs), ours)
        strata("push", "--insecure", ours)
        docker.docker("pull", ours)
        assert docker.docker("run", "--rm", ours, "cat", "/etc/flavour").stdout == "strata\n"

        docker.docker("run", "--name", "changer", ours, "sh", "-c", "echo docker > /etc/flavour")
        docker.docker("commit", "changer", theirs)
        docker.docker("rm", "changer")
        docker.docker("push", theirs)
        image_id = client.pull(fresh, theirs, insecure=True)
        assert image_id == json.loads(docker.docker("image", "inspect", theirs).stdout)[0]["Id"]
        with mounted("strata", fresh.image(image_id).lowerdirs, None, None, tmp_path / "mnt") as m:
            assert (m / "etc" / "flavour").read_text() == "docker\n"
