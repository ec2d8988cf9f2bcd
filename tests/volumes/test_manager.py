"""The volume manager and its local, bind and tmpfs drivers, on real directories and mounts."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from common import kernel
from common.errors import StrataError
from volumes import NoSuchVolume, VolumeManager
from volumes.usage import UNKNOWN, tree_size

from .conftest import Env


def leftovers(m: VolumeManager) -> list[str]:
    return sorted(n for n in os.listdir(m.store.root) if n != ".lock")


def test_local_volume_lifecycle(manager: VolumeManager) -> None:
    vol = manager.create("data1", None)
    assert vol.mountpoint.is_dir() and vol.type == "local"
    assert manager.path("data1") == vol.mountpoint
    (vol.mountpoint / "f").write_bytes(b"x" * 1000)
    got = manager.get("data1")
    assert got.status["Size"] == 1000 and got.status["MountCount"] == 0
    assert got.name == "data1" and got.created_at.endswith("Z")
    assert [v.name for v in manager.list_volumes()] == ["data1"]
    manager.remove("data1")
    assert not vol.mountpoint.exists()
    with pytest.raises(NoSuchVolume):
        manager.get("data1")
    assert leftovers(manager) == []


def test_create_is_idempotent_only_with_same_options(manager: VolumeManager) -> None:
    manager.create("same", {"mode": "0700"})
    manager.create("same", {"mode": "0700"})
    with pytest.raises(StrataError, match="already exists with different options"):
        manager.create("same", {"mode": "0755"})


def test_owner_and_mode(manager: VolumeManager) -> None:
    vol = manager.create("owned", {"uid": "1234", "gid": "2345", "mode": "0750"})
    st = os.stat(vol.mountpoint)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 2345, 0o750)


def test_mount_refcounts_per_id(manager: VolumeManager) -> None:
    manager.create("rc", {})
    mp = manager.mount("rc", "A")
    assert mp.is_dir()
    manager.mount("rc", "B")
    manager.mount("rc", "B")  # docker cp may reuse an ID
    assert manager.store.load("rc").mounts == {"A": 1, "B": 2}  # type: ignore[union-attr]
    with pytest.raises(StrataError, match="in use"):
        manager.remove("rc")
    with pytest.raises(StrataError, match="not mounted with ID C"):
        manager.unmount("rc", "C")
    manager.unmount("rc", "B")
    manager.unmount("rc", "A")
    manager.unmount("rc", "B")
    assert manager.get("rc").status["MountCount"] == 0
    with pytest.raises(StrataError, match="not mounted with ID A"):
        manager.unmount("rc", "A")
    manager.remove("rc")


def test_tmpfs_mounted_by_first_mount_released_by_last(manager: VolumeManager) -> None:
    vol = manager.create("tmp1", {"type": "tmpfs", "size": "1m", "uid": "7", "mode": "1777"})
    assert not kernel.is_mountpoint(vol.mountpoint)
    mp = manager.mount("tmp1", "A")
    manager.mount("tmp1", "B")
    assert kernel.is_mountpoint(mp)
    fstype = [f for _, t, f, _ in kernel.mounts() if t == str(mp)]
    assert fstype == ["tmpfs"]
    st = os.stat(mp)
    assert (st.st_uid, st.st_mode & 0o7777) == (7, 0o1777)
    # The size limit is the kernel's: writing past 1 MiB fails with ENOSPC.
    with pytest.raises(OSError) as e, open(mp / "big", "wb") as f:
        f.write(b"\0" * (2 << 20))
        f.flush()
    assert e.value.errno == errno.ENOSPC
    status = manager.get("tmp1").status
    assert status["Mounted"] and status["SizeLimit"] == 1 << 20 and status["Size"] > 0
    manager.unmount("tmp1", "A")
    assert kernel.is_mountpoint(mp)
    manager.unmount("tmp1", "B")
    assert not kernel.is_mountpoint(mp)
    assert not manager.get("tmp1").status["Mounted"]


def test_bind_only_under_allowed_roots(env: Env, manager: VolumeManager, tmp_path: Path) -> None:
    host = env.bind_root / "site"
    host.mkdir()
    (host / "index.html").write_text("hello")
    vol = manager.create("site", {"type": "bind", "device": str(host)})
    assert manager.mount("site", "A") == host == vol.mountpoint
    manager.unmount("site", "A")
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(StrataError, match="outside the allowed roots"):
        manager.create("bad1", {"type": "bind", "device": str(outside)})
    with pytest.raises(StrataError, match="outside the allowed roots"):
        manager.create("bad2", {"type": "bind", "device": f"{env.bind_root}/../outside"})
    (env.bind_root / "escape").symlink_to(outside)
    with pytest.raises(StrataError, match="outside the allowed roots"):
        manager.create("bad3", {"type": "bind", "device": str(env.bind_root / "escape")})
    with pytest.raises(StrataError, match="needs device"):
        manager.create("bad4", {"type": "bind"})
    with pytest.raises(StrataError, match="unknown option 'uid'"):
        manager.create("bad5", {"type": "bind", "device": str(host), "uid": "1"})
    with pytest.raises(StrataError, match="absolute"):
        manager.create("bad6", {"type": "bind", "device": "relative/dir"})
    # A symlink swapped in after create is caught at mount time.
    movable = env.bind_root / "movable"
    movable.mkdir()
    manager.create("moved", {"type": "bind", "device": str(movable)})
    movable.rmdir()
    movable.symlink_to(outside)
    with pytest.raises(StrataError, match="outside the allowed roots"):
        manager.mount("moved", "A")
    assert manager.store.load("moved").mounts == {}  # type: ignore[union-attr]
    manager.remove("site")
    assert (host / "index.html").read_text() == "hello"  # removing a bind volume keeps the host data
    assert [v.name for v in manager.list_volumes()] == ["moved"]


def test_bind_disabled_without_roots(tmp_path: Path) -> None:
    m = VolumeManager(tmp_path / "v")
    with pytest.raises(StrataError, match="bind volumes are disabled"):
        m.create("b1", {"type": "bind", "device": str(tmp_path)})


@pytest.mark.parametrize(
    ("name", "opts", "message"),
    [
        ("a/b", {}, "invalid volume name"),
        ("..", {}, "invalid volume name"),
        ("x", {}, "invalid volume name"),
        ("-lead", {}, "invalid volume name"),
        ("nul\0name", {}, "invalid volume name"),
        ("n" * 256, {}, "too long"),
        ("", {}, "empty"),
        ("ok1", {"colour": "red"}, "unknown option 'colour' for type=local"),
        ("ok1", {"type": "zfs"}, "unknown volume type 'zfs'"),
        ("ok1", {"type": "bind", "device": "/srv", "size": "1g"}, "cannot enforce a size limit"),
        ("ok1", {"type": "clone", "from": "x1", "size": "1g"}, "cannot enforce a size limit"),
        ("ok1", {"size": "1m"}, "too small"),
        ("ok1", {"type": "tmpfs", "size": "lots"}, "invalid size"),
        ("ok1", {"type": "tmpfs", "size": "0"}, "invalid size"),
        ("ok1", {"uid": "-1"}, "invalid uid"),
        ("ok1", {"mode": "999"}, "invalid mode"),
        ("ok1", {"uid": 5}, "must be a string"),
        ("ok1", ["type", "local"], "Opts must be an object"),
        ("ok1", {"type": "clone"}, "needs from="),
        ("ok1", {"type": "clone", "from": "missing"}, "no such volume: missing"),
        ("ok1", {"type": "clone", "from": "../etc"}, "invalid volume name"),
        ("ok1", {"mode": "0755\0"}, "NUL"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    manager: VolumeManager, name: str, opts: object, message: str
) -> None:
    with pytest.raises(StrataError, match=message):
        manager.create(name, opts)
    assert leftovers(manager) == []


def test_tmpfs_cannot_be_cloned(manager: VolumeManager) -> None:
    manager.create("mem", {"type": "tmpfs"})
    with pytest.raises(StrataError, match="cannot be cloned"):
        manager.create("memclone", {"type": "clone", "from": "mem"})
    assert leftovers(manager) == ["mem"]


def test_prune_removes_only_unused(env: Env, manager: VolumeManager) -> None:
    manager.create("busy", {})
    manager.create("idle", {})
    (manager.path("idle") / "f").write_bytes(b"12345")
    host = env.bind_root / "keep"
    host.mkdir()
    (host / "f").write_text("kept")
    manager.create("hostdir", {"type": "bind", "device": str(host)})
    manager.mount("busy", "A")
    removed = dict(manager.prune())
    assert removed == {"idle": 5, "hostdir": 0}
    assert [v.name for v in manager.list_volumes()] == ["busy"]
    assert (host / "f").read_text() == "kept"


def test_interrupted_create_and_remove_are_swept(manager: VolumeManager) -> None:
    # What a kill -9 in the middle of create or remove leaves: a staging or trash directory.
    (manager.store.root / ".new-abc" / "_data").mkdir(parents=True)
    (manager.store.root / ".trash-def" / "vol" / "_data").mkdir(parents=True)
    assert manager.list_volumes() == []  # never visible as volumes
    report = manager.recover()
    assert sorted(report) == ["removed leftover .new-abc", "removed leftover .trash-def"]
    assert leftovers(manager) == []


def test_unmount_releases_even_when_busy(manager: VolumeManager) -> None:
    """Docker ignores Unmount errors, so a busy tmpfs is detached lazily rather than leaking a reference."""
    manager.create("held", {"type": "tmpfs"})
    mp = manager.mount("held", "A")
    fd = os.open(mp / "f", os.O_CREAT | os.O_WRONLY)
    try:
        os.chdir(mp)
        manager.unmount("held", "A")
    finally:
        os.chdir("/")
        os.close(fd)
    assert not kernel.is_mountpoint(mp)
    assert manager.get("held").status["MountCount"] == 0


def test_size_walk_has_a_budget(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(20):
        (tmp_path / "d" / str(i)).write_bytes(b"ab")
    os.link(tmp_path / "d" / "0", tmp_path / "hardlink")  # counted once
    assert tree_size(tmp_path) == 40
    assert tree_size(tmp_path, budget=10) == UNKNOWN
    assert tree_size(tmp_path / "missing") == 0


def loop_devices_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout


def test_local_size_limit_through_an_ext4_image(manager: VolumeManager) -> None:
    vol = manager.create("quota", {"size": "16m", "uid": "1234", "gid": "2345", "mode": "0750"})
    image = manager.store.volume_dir("quota") / "disk.img"
    assert image.stat().st_size == 16 << 20 and image.stat().st_blocks * 512 < 16 << 20  # sparse
    assert not kernel.is_mountpoint(vol.mountpoint) and loop_devices_of(image) == ""
    mp = manager.mount("quota", "A")
    assert [f for _, t, f, _ in kernel.mounts() if t == str(mp)] == ["ext4"]
    assert os.listdir(mp) == []  # empty, so Docker copies image content in
    st = os.stat(mp)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 2345, 0o750)
    with pytest.raises(OSError) as e, open(mp / "big", "wb") as f:
        f.write(b"\1" * (20 << 20))
        f.flush()
        os.fsync(f.fileno())
    assert e.value.errno == errno.ENOSPC
    (mp / "big").unlink()
    (mp / "kept").write_text("in the image")
    status = manager.get("quota").status
    assert status["SizeLimit"] == 16 << 20 and status["Size"] == len("in the image") and status["Mounted"]
    manager.unmount("quota", "A")
    assert not kernel.is_mountpoint(mp) and loop_devices_of(image) == ""
    assert manager.get("quota").status["Size"] == UNKNOWN  # not counted while the image is not mounted
    mp = manager.mount("quota", "B")
    assert (mp / "kept").read_text() == "in the image"
    with pytest.raises(StrataError, match="has a size limit"):
        manager.create("quotaclone", {"type": "clone", "from": "quota"})
    manager.unmount("quota", "B")
    manager.remove("quota")
    assert leftovers(manager) == []
