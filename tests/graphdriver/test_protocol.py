"""The GraphDriver endpoints of a real `strata serve`, called as dockerd 20.10 calls them
(see plugin_api/graphdriver.py): layers as strata-unionfs mounts, diffs in and out,
hostile ids and tars refused with nothing changed, references that outlive a kill -9."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from common import kernel
from tests.store.helpers import TarBuilder

from .conftest import GraphService

BASE, MID, TOP = "a" * 64, "b" * 64, "c" * 64
INIT = "d" * 64 + "-init"


def _fstype(path: Path) -> str:
    return next((t for _, tgt, t, _ in kernel.mounts() if tgt == str(path)), "")


PASSWD, MOTD, TOOL = b"root:x:0:0::/root:/bin/sh\n", b"hello\n", b"#!/bin/sh\n"
BASE_SIZE = len(PASSWD + MOTD + TOOL)


def _base_tar() -> bytes:
    return (TarBuilder().dir("etc").file("etc/passwd", PASSWD).file("etc/motd", MOTD)
            .dir("bin").file("bin/tool", TOOL, mode=0o755).bytes())


def _image(svc: GraphService) -> None:
    """A two-layer image as `docker load` makes it: Create + ApplyDiff per layer."""
    svc.graph("Create", ID=BASE)
    assert svc.apply_diff(BASE, "", _base_tar()) == {"Size": BASE_SIZE}
    svc.graph("Create", ID=MID, Parent=BASE)
    mid = TarBuilder().dir("etc").file("etc/.wh.motd", b"").file("etc/added", b"new\n").bytes()
    assert svc.apply_diff(MID, BASE, mid) == {"Size": 4}


def test_activate_lists_both_protocols(service: GraphService) -> None:
    assert service.call("/Plugin.Activate") == {"Implements": ["VolumeDriver", "GraphDriver"]}
    assert service.graph("Init", Home="/var/lib/docker/strata", Opts=None, UIDMaps=None, GIDMaps=None) == {}
    assert service.graph("Capabilities") == {"Capabilities": {"ReproducesExactDiffs": False}}
    assert stat.S_IMODE(os.stat(service.env.root / "graph").st_mode) == 0o700


def test_layer_lifecycle(service: GraphService) -> None:
    _image(service)
    assert service.graph("Exists", ID=MID) == {"Exists": True}
    assert service.graph("Exists", ID=TOP) == {"Exists": False}
    service.graph("CreateReadWrite", ID=INIT, Parent=MID)
    service.graph("CreateReadWrite", ID=TOP, Parent=INIT)
    root = Path(service.graph("Get", ID=TOP)["Dir"])
    assert root == service.layers / TOP / "merged" and _fstype(root) == "fuse.strata-unionfs"
    assert sorted(os.listdir(root / "etc")) == ["added", "passwd"]  # motd whited out by MID
    (root / "etc" / "passwd").write_text("changed\n")
    (root / "etc" / "added").unlink()
    (root / "new").write_bytes(b"12345")
    # A second Get shares the mount; the first Put keeps it, the last one unmounts.
    assert service.graph("Get", ID=TOP)["Dir"] == str(root)
    assert service.record(TOP)["refs"] == 2
    service.graph("Put", ID=TOP)
    assert _fstype(root) == "fuse.strata-unionfs"

    changes = service.graph("Changes", ID=TOP, Parent=INIT)["Changes"]
    assert changes == [{"Path": "/etc", "Kind": 0}, {"Path": "/etc/added", "Kind": 2},
                       {"Path": "/etc/passwd", "Kind": 0}, {"Path": "/new", "Kind": 1}]
    assert service.graph("DiffSize", ID=TOP, Parent=INIT) == {"Size": len("changed\n") + 5}
    status, body = service.diff(TOP, INIT)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        names = {m.name: m for m in tf.getmembers()}
        assert set(names) == {"etc", "etc/.wh.added", "etc/passwd", "new"}
        assert tf.extractfile(names["new"]).read() == b"12345"  # type: ignore[union-attr]
    # The diff re-applies (commit = Diff then Create + ApplyDiff).
    committed = "e" * 64
    service.graph("Create", ID=committed, Parent=MID)
    service.apply_diff(committed, MID, body)
    view = Path(service.graph("Get", ID=committed)["Dir"])
    assert (view / "new").read_bytes() == b"12345" and not (view / "etc" / "added").exists()
    service.graph("Put", ID=committed)

    meta = service.graph("GetMetadata", ID=TOP)["Metadata"]
    assert meta["LowerDir"].split(":") == [str(service.layers / i / "diff") for i in (INIT, MID, BASE)]
    status_lines = dict(service.graph("Status")["Status"])
    assert status_lines["Layers"] == "5" and status_lines["Layers In Use"] == "1"

    service.graph("Put", ID=TOP)
    assert _fstype(root) == ""
    # A base layer is its plain directory, no mount.
    assert service.graph("Get", ID=BASE)["Dir"] == str(service.layers / BASE / "diff")
    service.graph("Put", ID=BASE)
    assert "Err" in service.graph("Remove", ID=BASE)  # layers stand on it
    for layer in (TOP, INIT, committed, MID, BASE):
        assert service.graph("Remove", ID=layer) == {}
    assert os.listdir(service.layers) == []
    assert service.graph("Cleanup") == {}


@pytest.mark.parametrize("bad", [
    "../../etc", "a" * 63, "A" * 64, "a" * 65, "-init", "a" * 64 + "-init/..", "a" * 64 + "\n",
    "/" + "a" * 63, "a" * 64 + "-INIT", "",
])
def test_hostile_ids_refused(service: GraphService, bad: str) -> None:
    for call in ("Create", "CreateReadWrite", "Get", "Put", "Remove"):
        out = service.graph(call, ID=bad)
        assert "invalid layer id" in out["Err"], (call, out)
    assert "invalid parent layer id" in service.graph("Create", ID=BASE, Parent=bad or "x")["Err"]
    assert "invalid layer id" in service.apply_diff(bad, "", _base_tar())["Err"]
    assert service.diff(bad)[0] == 500
    assert os.listdir(service.layers) == []


def test_wrong_types_and_options_refused(service: GraphService) -> None:
    assert "must be a string" in service.graph("Get", ID=["a" * 64])["Err"]
    assert "user namespace remapping" in service.graph("Init", Home="/x", UIDMaps=[{"ContainerID": 0}])["Err"]
    assert "storage options" in service.graph("Init", Home="/x", Opts=["strata.size=1g"])["Err"]
    assert "per-layer storage options" in service.graph("Create", ID=BASE, StorageOpt={"size": "1g"})["Err"]
    assert "does not exist" in service.graph("Create", ID=MID, Parent=BASE)["Err"]
    assert "does not exist" in service.graph("Get", ID=BASE)["Err"]
    status, body = service.diff(BASE)
    assert status == 500 and b"does not exist" in body
    assert os.listdir(service.layers) == []


def test_hostile_tars_refused_and_layer_left_empty(service: GraphService, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    service.graph("Create", ID=BASE)
    attacks = [
        TarBuilder().file("../escape", b"x").bytes(),
        TarBuilder().symlink("link", str(outside)).file("link/planted", b"x").bytes(),
        TarBuilder().hardlink("hl", str(outside / "x")).bytes(),
        b"not a tar at all" * 100,
    ]
    for tar in attacks:
        assert service.apply_diff(BASE, "", tar)["Err"].startswith("layer refused"), tar[:40]
        assert os.listdir(service.layers / BASE / "diff") == []
        assert sorted(os.listdir(service.layers / BASE)) == ["diff", "layer.json", "work"]
    assert os.listdir(outside) == []
    assert "parent" in service.apply_diff(BASE, MID, _base_tar())["Err"]  # not its parent
    assert service.apply_diff(BASE, "", _base_tar()) == {"Size": BASE_SIZE}
    assert "not empty" in service.apply_diff(BASE, "", _base_tar())["Err"]


def test_references_survive_kill9_and_dead_mounts_come_back(service: GraphService) -> None:
    _image(service)
    root = Path(service.graph("Get", ID=MID)["Dir"])
    service.graph("Get", ID=MID)
    (root / "written").write_text("kept")
    service.kill9()
    assert _fstype(root) == "fuse.strata-unionfs"  # the union's daemon outlives the service
    service.start()  # recovers at once: a container may use the union before dockerd calls
    assert service.record(MID)["refs"] == 2 and (root / "written").read_text() == "kept"
    # Its daemon dies while the service is down: the next start mounts the union again.
    service.kill9()
    pid = next(int(p.name) for p in Path("/proc").iterdir()
               if p.name.isdigit() and str(root).encode() in _cmdline(p))
    os.kill(pid, signal.SIGKILL)
    service.start()
    assert (root / "written").read_text() == "kept"
    assert "mounted again" in service.log_text()
    service.graph("Put", ID=MID)
    assert _fstype(root) == "fuse.strata-unionfs"
    service.graph("Put", ID=MID)
    assert _fstype(root) == ""
    assert service.graph("Put", ID=MID) == {}  # one too many (dockerd after its own crash): fine
    assert service.record(MID)["refs"] == 0


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_references_from_an_earlier_boot_dropped(service: GraphService) -> None:
    """A reboot ends every container without a Put: references recorded under another boot
    id no longer count (or the layer would stay in use for ever)."""
    _image(service)
    service.graph("Get", ID=MID)
    service.graph("Put", ID=MID)
    service.kill9()
    record = service.layers / MID / "layer.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "refs": 3, "boot": "an-earlier-boot"}))
    service.start()
    assert service.record(MID)["refs"] == 0
    assert "dropped 3 reference(s) from an earlier boot" in service.log_text()
    assert service.graph("Remove", ID=MID) == {}


def test_crash_leftovers_swept_at_start(service: GraphService) -> None:
    _image(service)
    service.kill9()
    (service.layers / f".new-{TOP}").mkdir()
    (service.layers / f".trash-{BASE}").mkdir()
    (service.layers / MID / "applied").mkdir()
    (service.layers / MID / "applied" / "half").write_text("x")
    service.start()
    assert sorted(os.listdir(service.layers)) == [BASE, MID]
    assert "applied" not in os.listdir(service.layers / MID)
    assert service.graph("Exists", ID=MID) == {"Exists": True}


def test_second_service_on_the_same_root_serves_volumes_only(service: GraphService, tmp_path: Path) -> None:
    """Another `strata serve` on the same state root (another plugin name) serves volumes;
    the layer store stays the first one's until it stops, then the other takes it over."""
    other = GraphService(service.env, tmp_path / "o.sock", tmp_path / "spec2", name="other")
    try:
        other.start()
        assert "another strata serve uses the layer store" in other.graph("Status")["Err"]
        assert other.call("/VolumeDriver.List", {}) == {"Volumes": []}
        service.graph("Create", ID=BASE)
        assert service.stop() == 0
        assert other.graph("Exists", ID=BASE) == {"Exists": True}
    finally:
        if other.proc is not None:
            other.stop()


def test_concurrent_gets_and_puts_keep_exact_counts(service: GraphService) -> None:
    """dockerd calls from many goroutines at once: 8 clients on each of 3 layers Get, then Put,
    leave every count at zero and nothing mounted; halfway each count is exactly 8."""
    _image(service)
    tops = [f"{c}" * 64 for c in "789"]
    for top in tops:
        service.graph("CreateReadWrite", ID=top, Parent=MID)
    jobs = [top for top in tops for _ in range(8)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        dirs = set(pool.map(lambda t: service.graph("Get", ID=t)["Dir"], jobs))
        assert dirs == {str(service.layers / t / "merged") for t in tops}
        assert [service.record(t)["refs"] for t in tops] == [8, 8, 8]
        assert all(_fstype(Path(d)) == "fuse.strata-unionfs" for d in dirs)
        assert list(pool.map(lambda t: service.graph("Put", ID=t), jobs)) == [{}] * len(jobs)
    assert [service.record(t)["refs"] for t in tops] == [0, 0, 0]
    assert not any(_fstype(Path(d)) for d in dirs)
