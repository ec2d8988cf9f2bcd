"""State that survives kill -9 of the service, and a host restart (mounts gone)."""

from __future__ import annotations

import json
from pathlib import Path

from plugin_api import protocol as p
from unionfs import kernel

from .conftest import Env, Service

ID_A, ID_B, ID_C = "a" * 64, "b" * 64, "c" * 64


def test_kill9_keeps_volumes_and_refcounts(service: Service, env: Env) -> None:
    assert service.call(p.CREATE, {"Name": "keep", "Opts": None}) == {}
    assert service.call(p.CREATE, {"Name": "mem", "Opts": {"type": "tmpfs", "size": "2m"}}) == {}
    keep = service.call(p.MOUNT, {"Name": "keep", "ID": ID_A})["Mountpoint"]
    service.call(p.MOUNT, {"Name": "keep", "ID": ID_B})
    mem = service.call(p.MOUNT, {"Name": "mem", "ID": ID_C})["Mountpoint"]
    Path(mem, "f").write_text("in memory")
    Path(keep, "f").write_text("on disk")

    service.kill9()
    assert not service.answers()
    service.start()

    # Get must answer for every volume right after the restart (else Docker makes a local one).
    assert service.call(p.GET, {"Name": "keep"})["Volume"]["Status"]["MountCount"] == 2
    assert service.call(p.GET, {"Name": "mem"})["Volume"]["Status"]["MountCount"] == 1
    assert sorted(v["Name"] for v in service.call(p.LIST, {})["Volumes"]) == ["keep", "mem"]
    # The tmpfs stayed mounted (the kernel kept it) with its content.
    assert kernel.is_mountpoint(mem) and Path(mem, "f").read_text() == "in memory"
    assert "in use" in service.call(p.REMOVE, {"Name": "keep"})["Err"]
    assert service.call(p.UNMOUNT, {"Name": "keep", "ID": ID_A}) == {}
    assert "in use" in service.call(p.REMOVE, {"Name": "keep"})["Err"]
    assert service.call(p.UNMOUNT, {"Name": "keep", "ID": ID_B}) == {}
    assert service.call(p.UNMOUNT, {"Name": "mem", "ID": ID_C}) == {}
    assert not kernel.is_mountpoint(mem)
    assert service.call(p.REMOVE, {"Name": "keep"}) == {}


def test_host_restart_remounts_referenced_tmpfs(service: Service, env: Env) -> None:
    """After a reboot the kernel mounts are gone but the records still hold references:
    the service mounts the volume again and says so in Status."""
    service.call(p.CREATE, {"Name": "mem", "Opts": {"type": "tmpfs", "size": "2m"}})
    service.call(p.CREATE, {"Name": "stale", "Opts": {"type": "tmpfs"}})
    mem = service.call(p.MOUNT, {"Name": "mem", "ID": ID_A})["Mountpoint"]
    service.stop()
    kernel.umount(mem)  # what a reboot does
    # A tmpfs mounted with no reference (a crash between mount and the record write).
    stale = env.root / "volumes" / "stale" / "_data"
    kernel.mount("tmpfs", stale, "tmpfs")
    service.start()
    assert kernel.is_mountpoint(mem)
    assert not kernel.is_mountpoint(stale)
    status = service.call(p.GET, {"Name": "mem"})["Volume"]["Status"]
    assert status["Mounted"] and status["MountCount"] == 1
    assert "mounted again on recovery" in status["Note"] and "content was lost" in status["Note"]
    assert "recovery: volume mem" in service.log.read_text()
    service.call(p.UNMOUNT, {"Name": "mem", "ID": ID_A})
    assert "Note" not in service.call(p.GET, {"Name": "mem"})["Volume"]["Status"]


def test_records_are_whole_json_after_every_change(service: Service, env: Env) -> None:
    service.call(p.CREATE, {"Name": "rec", "Opts": {"mode": "0700"}})
    for i in range(20):
        service.call(p.MOUNT, {"Name": "rec", "ID": f"id{i}"})
    raw = json.loads((env.root / "volumes" / "rec" / "volume.json").read_text())
    assert raw["Mounts"] == {f"id{i}": 1 for i in range(20)} and raw["Options"] == {"mode": "0700"}
    # No temp files left next to the record.
    files = sorted(x.name for x in (env.root / "volumes" / "rec").iterdir())
    assert files == ["_data", "lock", "volume.json"]
