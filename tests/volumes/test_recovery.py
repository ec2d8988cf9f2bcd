"""State that survives kill -9 of the service, and a host restart (mounts gone)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from common import kernel
from plugin_api import protocol as p
from plugin_api.client import PluginClient, PluginError

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


def test_vanished_mount_is_mounted_again(service: Service, env: Env) -> None:
    """A referenced volume whose mount disappeared in this boot (unmounted by hand, say):
    the service mounts it again on start and says so in Status."""
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


def rewrite_record(env: Env, name: str, **changes: object) -> None:
    path = env.root / "volumes" / name / "volume.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_references_from_before_a_reboot_are_dropped(service: Service, env: Env) -> None:
    """Docker never Unmounts the containers a reboot killed, and mounts again with the same IDs
    when it restarts them: references from an earlier boot must not count, or the volume stays
    "in use" for ever."""
    service.call(p.CREATE, {"Name": "disk", "Opts": None})
    service.call(p.CREATE, {"Name": "mem", "Opts": {"type": "tmpfs"}})
    service.call(p.MOUNT, {"Name": "disk", "ID": ID_A})
    mem = service.call(p.MOUNT, {"Name": "mem", "ID": ID_B})["Mountpoint"]
    service.stop()
    kernel.umount(mem)  # a reboot takes the mounts ...
    rewrite_record(env, "disk", Boot="an-earlier-boot")  # ... and the boot id changes
    rewrite_record(env, "mem", Boot="an-earlier-boot")
    service.start()
    assert not kernel.is_mountpoint(mem)  # nothing to mount again: nobody uses it any more
    for name in ("disk", "mem"):
        st = service.call(p.GET, {"Name": name})["Volume"]["Status"]
        assert st["MountCount"] == 0 and "from before a reboot dropped" in st["Note"]
    # Docker restarting the container mounts with the same ID; one Unmount then frees it.
    service.call(p.MOUNT, {"Name": "disk", "ID": ID_A})
    service.call(p.UNMOUNT, {"Name": "disk", "ID": ID_A})
    assert service.call(p.REMOVE, {"Name": "disk"}) == {}


def test_stale_references_do_not_block_without_the_service(env: Env) -> None:
    m = env.manager()
    m.create("cli1", {})
    m.mount("cli1", ID_A)
    rewrite_record(env, "cli1", Boot="an-earlier-boot")
    assert m.get("cli1").status["MountCount"] == 0
    m.remove("cli1")


def test_force_remove_drops_references(env: Env) -> None:
    m = env.manager()
    m.create("stuck", {"type": "tmpfs"})
    mp = m.mount("stuck", ID_A)
    res = env.strata("volume", "rm", "stuck", check=False)
    assert res.returncode == 1 and "--force" in res.stderr
    assert env.strata("volume", "rm", "--force", "stuck").stdout == "stuck\n"
    assert not kernel.is_mountpoint(mp) and not mp.exists()


def test_kill9_under_load_leaves_consistent_records(service: Service, env: Env) -> None:
    """kill -9 while 16 clients mount: every record still parses, and holds every acknowledged
    reference plus at most the one each client had in flight."""
    vols = [f"load{i}" for i in range(4)]
    for v in vols:
        service.call(p.CREATE, {"Name": v, "Opts": {"type": "tmpfs"} if v == "load0" else None})
    acked: dict[int, list[tuple[str, str]]] = {i: [] for i in range(16)}
    inflight: dict[int, tuple[str, str]] = {}

    async def client(i: int) -> None:
        async with PluginClient(service.address, timeout=10) as c:
            for n in range(10_000):
                vol, mid = vols[(i + n) % len(vols)], f"{i}-{n}"
                inflight[i] = (vol, mid)
                try:
                    await c.mount(vol, mid)
                except PluginError:
                    return  # the service is gone
                acked[i].append((vol, mid))

    async def main() -> None:
        tasks = [asyncio.create_task(client(i)) for i in range(16)]
        while sum(len(a) for a in acked.values()) < 300:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(service.kill9)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    service.start()
    for v in vols:
        assert "Volume" in service.call(p.GET, {"Name": v})
        held = set(json.loads((env.root / "volumes" / v / "volume.json").read_text())["Mounts"])
        must = {mid for a in acked.values() for vol, mid in a if vol == v}
        may = must | {mid for vol, mid in inflight.values() if vol == v}
        assert must <= held <= may
    assert kernel.is_mountpoint(env.root / "volumes" / "load0" / "_data")
    assert not [x for x in (env.root / "volumes").iterdir() if x.name.startswith((".new-", ".trash-"))]
