"""Volumes against issue 11's attacks: host users reaching a volume's files, trees deeper
than Python's stack in a volume and in crash leftovers, sizes that overflow or outgrow the
disk, JSON nested 30,000 deep, a bind directory swapped for a symlink. Each is refused
with one line or works, and the service starts again afterwards."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import kernel
from common.errors import StrataError
from common.parsing import MAX_JSON_DEPTH, parse_size
from plugin_api import protocol as p
from tests.store.helpers import as_nobody, depth_of, make_deep, reachable_dir
from volumes import VolumeConfig, VolumeManager, loopfs

from .conftest import Env, Service

ID_A = "a" * 64


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_host_users_cannot_reach_a_volume_whatever_the_umask() -> None:
    with reachable_dir() as top:
        old = os.umask(0)
        try:
            manager = VolumeManager.open(str(top / "state"))
            data = manager.mount(manager.create("v1", {"mode": "0777"}).name, ID_A)
            shutil.copy("/usr/bin/id", data / "id")
            os.chmod(data / "id", 0o4755)
        finally:
            os.umask(old)
        for d in (top / "state", top / "state" / "volumes", top / "state" / "volumes" / "v1"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o710, d
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o777  # the volume's own mode, as asked
        ran = as_nobody(str(data / "id"), "-u")
        assert ran.returncode != 0 and "Permission denied" in ran.stderr
        assert as_nobody("ls", str(data)).returncode != 0
        manager.unmount("v1", ID_A)
        manager.remove("v1")


def test_remove_of_a_volume_holding_5000_levels_and_the_service_starts_again(
    service: Service, env: Env
) -> None:
    """Issue 11: Remove of such a volume left `.trash-*` and `strata serve` could not start."""
    assert service.call(p.CREATE, {"Name": "deep", "Opts": {}}) == {}
    mountpoint = Path(service.call(p.MOUNT, {"Name": "deep", "ID": ID_A})["Mountpoint"])
    make_deep(mountpoint, 5_000, b"bottom")
    status = service.call(p.GET, {"Name": "deep"})["Volume"]["Status"]
    assert status["Size"] == len(b"bottom")
    assert service.call(p.UNMOUNT, {"Name": "deep", "ID": ID_A}) == {}
    assert service.call(p.REMOVE, {"Name": "deep"}) == {}
    assert [n for n in os.listdir(env.root / "volumes") if n.startswith(".") and n != ".lock"] == []
    service.stop()
    service.start()
    assert service.call(p.CREATE, {"Name": "after", "Opts": {}}) == {}
    assert "after" in [v["Name"] for v in service.call(p.LIST, {})["Volumes"]]


def test_leftovers_are_swept_at_start_whatever_they_hold(service: Service, env: Env) -> None:
    service.stop()
    vroot = env.root / "volumes"
    for name in (".trash-deep", ".new-deep"):
        (vroot / name).mkdir()
        make_deep(vroot / name, 5_000, b"x")
        os.mkfifo(vroot / name / "fifo")
        (vroot / name / "link").symlink_to("/etc")
        (vroot / name / "ro").mkdir(mode=0)
    (vroot / ".trash-mounted" / "mnt").mkdir(parents=True)
    kernel.mount("tmpfs", vroot / ".trash-mounted" / "mnt", "tmpfs")
    service.start()
    assert [n for n in os.listdir(vroot) if n.startswith((".new-", ".trash-"))] == []
    assert "removed leftover .trash-deep" in service.log_text()
    assert os.path.isdir("/etc")


def test_json_nested_30000_deep_gets_a_one_line_err(service: Service) -> None:
    # (Objects nest in 5 bytes a level: 10,000 of them fit the 64 KiB a request may have.)
    opts = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"Name": "x", "Opts": ' + opts + b"}"):
        status, raw = service.raw(p.CREATE, body)
        err = json.loads(raw)["Err"]
        assert status == 200 and err == f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    assert service.call(p.LIST, {})["Volumes"] == []


def test_sizes_are_bounded_by_the_filesystem_and_the_administrator(env: Env, manager: VolumeManager) -> None:
    """Issue 11: size=1t wrote 1.1 GiB of ext4 metadata at Create, size=60t could fill the
    disk, and a tmpfs size=99999999999999999999t overflowed to no limit."""
    over = _free(env.root / "volumes") + (1 << 30)
    with pytest.raises(StrataError, match="more than the free space on the volume root's filesystem"):
        manager.create("big", {"size": str(over)})
    with pytest.raises(StrataError, match="more than the machine's memory"):
        manager.create("mem", {"type": "tmpfs", "size": "60t"})
    with pytest.raises(StrataError, match="too large"):
        manager.create("mem", {"type": "tmpfs", "size": "99999999999999999999t"})
    assert manager.list_volumes() == []
    # `--memory 1.5g` and `-o size=1.5g`: one grammar.
    assert manager.create("half", {"type": "tmpfs", "size": "1.5g"}).options["size"] == str(3 << 29)
    assert parse_size("1.5g") == 3 << 29

    env.config.write_text(json.dumps({"max_size": "1g"}))
    capped = env.manager()
    assert capped.config.max_size == 1 << 30
    with pytest.raises(StrataError, match="over the administrator's maximum"):
        capped.create("capped", {"type": "tmpfs", "size": "2g"})
    env.config.write_text(json.dumps({"max_size": "lots"}))
    with pytest.raises(StrataError, match="invalid max_size"):
        VolumeConfig.load(env.config)


def test_a_big_size_limit_writes_only_what_ext4_uses(
    env: Env, manager: VolumeManager, tmp_path: Path
) -> None:
    # The 1 TiB image of the issue, made where it fits as a sparse file.
    (tmp_path / "root").mkdir()
    loopfs.make_image(tmp_path / "1t.img", 1 << 40, tmp_path / "root", 0, 0, 0o755)
    assert os.stat(tmp_path / "1t.img").st_blocks * 512 < 32 << 20  # was 1,090,220,032 bytes
    # Through the manager, as big as this disk allows (20 GiB wrote 139 MB before).
    size = min(20 << 30, _free(env.root / "volumes") // 2)
    manager.create("big", {"size": str(size)})
    image = env.root / "volumes" / "big" / "disk.img"
    assert os.stat(image).st_blocks * 512 < 32 << 20
    data = manager.mount("big", ID_A)
    opts = next(o for _, t, _, o in kernel.mounts() if t == str(data))
    assert "noinit_itable" in opts  # the kernel never zeroes the inode tables behind our back
    manager.unmount("big", ID_A)
    manager.remove("big")


@pytest.fixture
def bind_volume(env: Env, manager: VolumeManager) -> Iterator[Path]:
    host = env.bind_root / "site"
    host.mkdir()
    (host / "small").write_bytes(b"12345")
    manager.create("site", {"type": "bind", "device": str(host)})
    yield host


def test_get_of_a_bind_volume_never_walks_a_symlink_swapped_in(
    env: Env, manager: VolumeManager, bind_volume: Path, tmp_path: Path
) -> None:
    assert manager.get("site").status["Size"] == 5
    make_deep(bind_volume, 1_500, b"deep")
    assert manager.get("site").status["Size"] == 9 and depth_of(bind_volume) == 1_500
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "big").write_bytes(b"x" * 100_000)
    bind_volume.rename(env.bind_root / "moved")
    bind_volume.symlink_to(elsewhere)
    assert manager.get("site").status["Size"] == -1
    bind_volume.unlink()
    (env.bind_root / "moved").rename(bind_volume)
    assert manager.get("site").status["Size"] == 9


@pytest.mark.parametrize("text, size", [
    ("64m", 64 << 20), ("1G", 1 << 30), ("512KiB", 512 << 10), ("1048576", 1 << 20), ("2 m", 2 << 20),
    ("1.5g", 3 << 29), ("0.5k", 512), ("1t", 1 << 40), ("8191p", 8191 << 50), ("10b", 10), ("0", 0),
])
def test_the_one_size_grammar(text: str, size: int) -> None:
    """docker's (units.RAMInBytes): what `--memory` and `-o size=` both take."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "1.5.5g", "1x", "", "8192p", "9" * 5000])
def test_the_one_size_grammar_refuses_in_one_line(text: str) -> None:
    with pytest.raises(StrataError) as refused:
        parse_size(text)
    assert len(str(refused.value)) < 120
