"""type=clone: a copy-on-write snapshot of another volume through strata-unionfs."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from common import kernel
from common.errors import StrataError
from plugin_api import protocol as p
from unionfs import client
from volumes import VolumeManager
from volumes.drivers.base import open_layer

from .conftest import Env, Service


def tree(top: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(top):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), top) + "/"] = None
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), top)] = Path(dirpath, f).read_bytes()
    return out


@pytest.fixture
def source(manager: VolumeManager) -> Path:
    client.program()  # fails with a clear reason when strata-unionfs is not installed
    mp = manager.create("src", {}).mountpoint
    (mp / "keep.txt").write_text("original\n")
    (mp / "edit.txt").write_text("before\n")
    (mp / "gone.txt").write_text("delete me\n")
    (mp / "dir" / "sub").mkdir(parents=True)
    (mp / "dir" / "sub" / "deep").write_text("deep\n")
    return mp


def test_clone_is_copy_on_write_and_leaves_source_alone(manager: VolumeManager, source: Path) -> None:
    before = tree(source)
    manager.create("snap", {"type": "clone", "from": "src", "uid": "1000", "mode": "0770"})
    mp = manager.mount("snap", "A")
    assert kernel.is_mountpoint(mp)
    assert tree(mp) == before
    st = os.stat(mp)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o770)
    with open(mp / "edit.txt", "a") as f:
        f.write("after\n")
    (mp / "gone.txt").unlink()
    (mp / "new.txt").write_text("new\n")
    os.rename(mp / "dir", mp / "moved")
    assert (mp / "edit.txt").read_text() == "before\nafter\n"
    assert sorted(os.listdir(mp)) == ["edit.txt", "keep.txt", "moved", "new.txt"]
    assert tree(source) == before  # the source is never written

    manager.mount("snap", "B")
    manager.unmount("snap", "A")
    assert kernel.is_mountpoint(mp)
    manager.unmount("snap", "B")
    assert not kernel.is_mountpoint(mp)
    # The clone's own changes persist in its upper across mounts.
    mp = manager.mount("snap", "C")
    assert sorted(os.listdir(mp)) == ["edit.txt", "keep.txt", "moved", "new.txt"]
    assert (mp / "moved" / "sub" / "deep").read_text() == "deep\n"
    status = manager.get("snap").status
    assert status["From"] == "src" and status["Mounted"] and status["Size"] > 0
    with pytest.raises(StrataError, match="cloned by snap"):
        manager.remove("src")
    manager.unmount("snap", "C")
    manager.remove("snap")
    manager.remove("src")


def test_clone_of_a_clone(manager: VolumeManager, source: Path) -> None:
    manager.create("c1", {"type": "clone", "from": "src"})
    mp1 = manager.mount("c1", "A")
    (mp1 / "keep.txt").write_text("changed in c1\n")
    (mp1 / "gone.txt").unlink()
    manager.unmount("c1", "A")
    manager.create("c2", {"type": "clone", "from": "c1"})
    mp2 = manager.mount("c2", "A")
    assert (mp2 / "keep.txt").read_text() == "changed in c1\n"
    assert not (mp2 / "gone.txt").exists()  # c1's whiteout hides it in c2 too
    (mp2 / "edit.txt").write_text("c2 only\n")
    manager.unmount("c2", "A")
    assert (source / "edit.txt").read_text() == "before\n"
    assert (source / "keep.txt").read_text() == "original\n"
    assert sorted(n for n, _ in manager.prune()) == ["c1", "c2", "src"]  # clones before sources


def test_clone_remounted_after_kill9_and_reboot(env: Env, service: Service, source: Path) -> None:
    opts = {"type": "clone", "from": "src"}
    assert service.call("/VolumeDriver.Create", {"Name": "cl", "Opts": opts}) == {}
    mp = service.call("/VolumeDriver.Mount", {"Name": "cl", "ID": "a" * 64})["Mountpoint"]
    Path(mp, "written").write_text("kept in the upper\n")
    service.kill9()
    assert kernel.is_mountpoint(mp)  # the FUSE daemon outlives the service
    service.start()
    assert service.call("/VolumeDriver.Get", {"Name": "cl"})["Volume"]["Status"]["MountCount"] == 1
    service.stop()
    kernel.umount(mp, kernel.MNT_DETACH)  # what a reboot does to the mount
    service.start()
    assert kernel.is_mountpoint(mp)
    assert Path(mp, "written").read_text() == "kept in the upper\n"
    assert Path(mp, "keep.txt").read_text() == "original\n"
    st = service.call("/VolumeDriver.Get", {"Name": "cl"})["Volume"]["Status"]
    assert "mounted again on recovery" in st["Note"] and "lost" not in st["Note"]
    # The FUSE daemon dies: the mount answers ENOTCONN; a restart mounts it afresh.
    daemons = fuse_daemons(Path(mp))  # the detached mount's daemon may not have exited yet
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(OSError):
        os.listdir(mp)
    service.stop()
    service.start()
    assert Path(mp, "written").read_text() == "kept in the upper\n"
    assert fuse_daemons(Path(mp)) - daemons
    assert service.call("/VolumeDriver.Unmount", {"Name": "cl", "ID": "a" * 64}) == {}
    assert not kernel.is_mountpoint(mp)


@pytest.fixture
def bind_site(env: Env, tmp_path: Path) -> tuple[Path, Path]:
    """A host directory inside the bind roots, and one outside them holding a canary."""
    client.program()
    site = env.bind_root / "site"
    site.mkdir()
    (site / "index.html").write_text("hello\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host only\n")
    return site, outside


def test_clone_of_a_bind_volume_turned_symlink_is_refused(
    env: Env, service: Service, bind_site: tuple[Path, Path]
) -> None:
    """Every layer a clone stacks is checked as a Mount of its own volume would check it:
    once the bind source's directory is a symlink out of bind_roots, Mount of a clone of
    it, and of a clone of that clone, answers one line of Err and mounts nothing."""
    site, outside = bind_site
    for name, opts in (("host", {"type": "bind", "device": str(site)}),
                       ("c1", {"type": "clone", "from": "host"}),
                       ("c2", {"type": "clone", "from": "c1"})):
        assert service.call(p.CREATE, {"Name": name, "Opts": opts}) == {}
    for name in ("c1", "c2"):
        mp = service.call(p.MOUNT, {"Name": name, "ID": "a" * 64})["Mountpoint"]
        assert os.listdir(mp) == ["index.html"]
        assert service.call(p.UNMOUNT, {"Name": name, "ID": "a" * 64}) == {}
    site.rename(site.with_name("site.old"))
    site.symlink_to(outside)
    for name in ("host", "c1", "c2"):
        answer = service.call(p.MOUNT, {"Name": name, "ID": "b" * 64})
        err = answer.get("Err", "")
        assert f"bind device {site} is outside the allowed roots" in err and "\n" not in err, answer
        if name != "host":
            assert err.startswith(f"cannot mount clone {name}: "), err
            mp = env.root / "volumes" / name / "_data"
            assert not kernel.is_mountpoint(mp) and not fuse_daemon_pids(mp)
        status = service.call(p.GET, {"Name": name})["Volume"]["Status"]
        assert status["MountCount"] == 0 and status["Mounted"] is False, status
    assert (outside / "secret").read_text() == "host only\n"


def test_clone_mounted_before_its_bind_source_became_a_symlink(
    manager: VolumeManager, bind_site: tuple[Path, Path]
) -> None:
    """A mounted clone holds its lower layers as the directories checked at Mount: a symlink
    swapped in for the bind source's directory afterwards is never followed."""
    site, outside = bind_site
    manager.create("host", {"type": "bind", "device": str(site)})
    manager.create("c1", {"type": "clone", "from": "host"})
    manager.create("c2", {"type": "clone", "from": "c1"})
    mps = [manager.mount(name, "A") for name in ("c1", "c2")]
    site.rename(site.with_name("site.old"))
    site.symlink_to(outside)
    for mp in mps:
        assert os.listdir(mp) == ["index.html"]
        assert (mp / "index.html").read_text() == "hello\n"
        assert not (mp / "secret").exists()
    for name in ("c2", "c1"):
        manager.unmount(name, "A")


def test_open_layer_holds_the_checked_path(tmp_path: Path) -> None:
    """The descriptor a clone hands strata-unionfs is of the directory at exactly the path
    checked: a symlink at any component of it, or a directory moved there, is refused."""
    (tmp_path / "real" / "layer").mkdir(parents=True)
    fd = open_layer(tmp_path / "real" / "layer")
    try:
        assert os.path.samestat(os.stat(f"/proc/self/fd/{fd}"), os.stat(tmp_path / "real" / "layer"))
    finally:
        os.close(fd)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(StrataError, match="resolves elsewhere; refusing"):
        open_layer(tmp_path / "link" / "layer")
    (tmp_path / "last").symlink_to(tmp_path / "real" / "layer")
    with pytest.raises(StrataError, match="refusing"):
        open_layer(tmp_path / "last")


def fuse_daemon_pids(mountpoint: Path) -> set[int]:
    """The strata-unionfs processes with mountpoint on their command line."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"strata-unionfs" in a for a in argv[:2]) and str(mountpoint).encode() in argv:
                found.add(int(entry.name))
    return found


def fuse_daemons(mountpoint: Path) -> set[int]:
    found = fuse_daemon_pids(mountpoint)
    assert found, f"no strata-unionfs process for {mountpoint}"
    return found
