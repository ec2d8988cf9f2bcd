"""strata as the snapshotter of a real containerd (Debian's 1.6.20, private root, state,
socket and namespace; benchmarks.containerd): images in by `ctr images import` and
`ctr images pull`, containers by `ctr run`, `ctr snapshots` by hand, garbage collection,
and a kill -9 of the snapshotter under a running container."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks.containerd import (
    CTR,
    DAEMON_PATH,
    Containerd,
    Snapshotter,
    image_archive,
    running_containerd,
    running_snapshotter,
)
from images.produce import produce_layer
from plugin_api._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from plugin_api._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from tests.store.registry import running_registry

STRATA = str(Path(sys.executable).with_name("strata"))
IMAGE = "docker.io/library/bb:3"
SN = ("--snapshotter", "strata")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bb:3: busybox, then a layer deleting /bin/vi and adding /etc/motd, then one more."""
    return image_archive(tmp_path_factory.mktemp("image") / "bb3.tar", "bb:3", layers=3)


@pytest.fixture(params=["helper", "premount"])
def env(request: pytest.FixtureRequest) -> Iterator[tuple[Snapshotter, Containerd]]:
    """containerd with strata in both mount modes: unions mounted by containerd through
    mount.fuse3 (the default), or by the snapshotter itself and handed over as binds."""
    with running_snapshotter(premount=request.param == "premount") as snap, \
            running_containerd(snap.address) as ctrd:
        yield snap, ctrd
    assert not [m for m in _mounts() if str(snap.root.parent) in m or str(ctrd.dir) in m]


def _mounts() -> list[str]:
    return Path("/proc/self/mounts").read_text().splitlines()


def _infos(snap: Snapshotter) -> list[pb.Info]:
    with grpc.insecure_channel(f"unix:{snap.address}") as ch:
        return [i for r in pb_grpc.SnapshotsStub(ch).List(pb.ListSnapshotsRequest()) for i in r.info]


def _daemons_of(snap: Snapshotter) -> list[int]:
    """strata-unionfs processes serving one of this snapshotter's snapshots."""
    needle = str(snap.root).encode()
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"strata-unionfs" in cmd and needle in cmd:
                out.append(int(p.name))
    return out


def _assert_nothing_left(snap: Snapshotter, ctrd: Containerd) -> None:
    ctrd.ctr("images", "rm", "--sync", IMAGE, check=False)
    ctrd.collect_garbage()  # what an earlier, asynchronous collection may have left for later
    assert _infos(snap) == []
    assert os.listdir(snap.root / "snapshotter" / "snapshots") == []
    assert not [m for m in _mounts() if str(snap.root) in m or str(ctrd.root) in m]
    assert _daemons_of(snap) == []


RUN_SCRIPT = "ls /layers; cat /etc/motd; test -e /bin/vi || echo no-vi; echo written > /new; cat /new; id -u"


def test_import_run_and_gc(env: tuple[Snapshotter, Containerd], archive: Path) -> None:
    snap, ctrd = env
    out = ctrd.ctr("images", "import", *SN, str(archive)).stdout
    assert "unpacking docker.io/library/bb:3" in out
    ls = ctrd.ctr("snapshots", *SN, "ls").stdout.splitlines()[1:]
    assert len(ls) == 3 and all(line.split()[-1] == "Committed" for line in ls)
    infos = _infos(snap)
    assert [i.kind for i in infos] == [pb.COMMITTED] * 3
    assert infos[1].parent == infos[0].name and infos[2].parent == infos[1].name
    # The layers are in the overlay format: layer 2 deleted /bin/vi with a 0/0 whiteout...
    layer2 = snap.root / "snapshotter" / "snapshots" / "2" / "fs"
    st = os.lstat(layer2 / "bin" / "vi")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # ...which strata's layer producer turns back into an OCI whiteout.
    with open(snap.root / "layer2.tar", "wb") as f:
        produce_layer(layer2, f)
    with tarfile.open(snap.root / "layer2.tar") as t:
        assert {"bin/.wh.vi", "etc/motd", "layers/2"} <= set(t.getnames())

    res = ctrd.run(IMAGE, "t1", "sh", "-c", RUN_SCRIPT)
    assert res.stdout.split() == ["2", "3", "strata", "no-vi", "written", "0"]
    # A second container does not see the first one's write.
    res = ctrd.run(IMAGE, "t2", "sh", "-c", "cat /new 2>&1; cat /etc/motd")
    assert "No such file" in res.stdout and res.stdout.split()[-1] == "strata"
    _assert_nothing_left(snap, ctrd)


def test_pull_from_registry(env: tuple[Snapshotter, Containerd], archive: Path, tmp_path: Path) -> None:
    snap, ctrd = env
    root = ["--root", str(tmp_path / "store")]
    with running_registry() as reg:
        subprocess.run([STRATA, *root, "load", "-i", str(archive)], check=True, capture_output=True)
        ref = f"{reg.host}/bb:3"
        subprocess.run([STRATA, *root, "tag", "bb:3", ref], check=True, capture_output=True)
        subprocess.run([STRATA, *root, "push", "--insecure", ref], check=True, capture_output=True)
        ctrd.ctr("images", "pull", "--plain-http", *SN, ref)
    assert len(_infos(snap)) == 3
    res = ctrd.run(ref, "t1", "sh", "-c", RUN_SCRIPT)
    assert res.stdout.split() == ["2", "3", "strata", "no-vi", "written", "0"]
    ctrd.ctr("images", "rm", "--sync", ref)
    _assert_nothing_left(snap, ctrd)


def _mount_as_containerd(printed: str, premount: bool) -> str:
    """Mount what `ctr snapshots mounts TARGET KEY` prints (`mount -t TYPE SOURCE TARGET -o
    OPTS`) as containerd 1.6 would: a `fuse3.*` type through the mount.fuse3 helper, `-t`
    without the prefix, with containerd's PATH (systemd's default, where mount.fuse3 looks
    for strata-unionfs); with premount, a bind of the union strata mounted. Returns the options."""
    mount, t, fstype, source, target, o, options = printed.split()
    if premount:
        assert (mount, t, fstype, o) == ("mount", "-t", "bind", "-o") and source.endswith("/merged")
        subprocess.run(["mount", "-o", options, source, target], check=True, capture_output=True)
        return options
    assert (mount, t, fstype, o) == ("mount", "-t", "fuse3.strata-unionfs", "-o")
    subprocess.run(["mount.fuse3", source, target, "-o", options, "-t", "strata-unionfs"], check=True,
                   env={"PATH": DAEMON_PATH}, capture_output=True)
    return options


def test_ctr_snapshots_by_hand(env: tuple[Snapshotter, Containerd], tmp_path: Path) -> None:
    snap, ctrd = env
    sn = ("snapshots", *SN)
    mounts = json.loads(ctrd.ctr(*sn, "prepare", "--mounts", "base-rw").stdout)
    assert mounts[0]["Type"] == "bind"
    Path(mounts[0]["Source"], "hello").write_text("from base\n")
    ctrd.ctr(*sn, "commit", "base", "base-rw")
    ctrd.ctr(*sn, "prepare", "top-rw", "base")
    target = tmp_path / "mnt"
    target.mkdir()
    _mount_as_containerd(ctrd.ctr(*sn, "mounts", str(target), "top-rw").stdout, snap.premount)
    try:
        assert (target / "hello").read_text() == "from base\n"
        (target / "top").write_text("from top\n")
        (target / "hello").unlink()
    finally:
        subprocess.run(["umount", str(target)], check=True)
    ctrd.ctr(*sn, "commit", "top", "top-rw")
    ctrd.ctr(*sn, "view", "look", "top")
    usage = ctrd.ctr(*sn, "usage").stdout
    assert "base" in usage and "top" in usage
    tree = ctrd.ctr(*sn, "tree").stdout
    assert tree.index("base") < tree.index("top") < tree.index("look")
    ctrd.ctr(*sn, "label", "top", "team=storage")
    info = json.loads(ctrd.ctr(*sn, "info", "top").stdout)
    assert info["Kind"] == "Committed" and info["Parent"] == "base" and info["Labels"]["team"] == "storage"
    # The view over two layers is a read-only union: top's file, base's one gone (a whiteout).
    options = _mount_as_containerd(ctrd.ctr(*sn, "mounts", str(target), "look").stdout, snap.premount)
    assert "upperdir" not in options and options.startswith("ro")
    try:
        assert sorted(os.listdir(target)) == ["top"]
        with pytest.raises(OSError):
            (target / "x").write_text("read-only")
    finally:
        subprocess.run(["umount", str(target)], check=True)
    (stored,) = [i for i in _infos(snap) if i.name.endswith("/look")]
    assert stored.kind == pb.VIEW and stored.parent.endswith("/top")

    # Bad requests get containerd's errors (some answered by containerd's own metadata first).
    errors = [
        (("prepare", "top-rw2", "no-such-parent"), "not found"),
        (("prepare", "look", "top"), "already exists"),
        (("commit", "again", "look"), "failed precondition"),
        (("rm", "base"), "failed precondition"),
        (("info", "unknown"), "not found"),
    ]
    for args, message in errors:
        res = ctrd.ctr(*sn, *args, check=False)
        assert res.returncode != 0 and message in res.stderr, (args, res.stderr)
    # `ctr snapshots view` gives the view no GC root label: containerd's garbage collector may
    # take it once anything triggers a collection (the diff below does), so it goes first.
    ctrd.ctr(*sn, "rm", "look")
    # containerd's differ reads both through the mounts strata returns: the layer it makes
    # holds the new file and an OCI whiteout for the deleted one.
    ctr = [CTR, "--address", str(ctrd.address), "--namespace", ctrd.namespace, *sn]
    blob = subprocess.run([*ctr, "diff", "top"], capture_output=True, check=True).stdout  # the layer itself
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob)) as t:
        assert sorted(t.getnames()) == [".wh.hello", "top"]
    for key in ("top", "base"):
        ctrd.ctr(*sn, "rm", key)
    # containerd forgets them at once and has its garbage collector remove them from the
    # snapshotter later (asynchronously); a synchronous collection does it now.
    ctrd.collect_garbage()
    assert _infos(snap) == []
    assert os.listdir(snap.root / "snapshotter" / "snapshots") == []


def test_kill9_under_running_container(env: tuple[Snapshotter, Containerd], archive: Path) -> None:
    snap, ctrd = env
    ctrd.ctr("images", "import", *SN, str(archive))
    ctrd.run(IMAGE, "long", "sh", "-c", "echo before > /state; exec sleep 600", flags=("-d",))
    exec_n = iter(range(100))

    def sh(script: str) -> str:
        return ctrd.ctr("tasks", "exec", "--exec-id", f"e{next(exec_n)}", "long", "sh", "-c", script).stdout

    assert sh("sleep 0.2; cat /state /etc/motd").split() == ["before", "strata"]
    before = [(i.name, i.parent, i.kind, dict(i.labels)) for i in _infos(snap)]
    assert len(before) == 4 and before[-1][2] == pb.ACTIVE
    snap.kill9()
    # The container keeps its filesystem: the union's daemon is not the snapshotter.
    assert sh("echo after >> /state; cat /state; ls /layers").split() == ["before", "after", "2", "3"]
    # While it is down, containerd cannot list the snapshots (ctr still shows the plugin "ok").
    down = ctrd.ctr("snapshots", *SN, "ls", check=False)
    assert "long" not in down.stdout
    assert "strata" in ctrd.ctr("plugins", "ls").stdout
    snap.start()
    assert [(i.name, i.parent, i.kind, dict(i.labels)) for i in _infos(snap)] == before
    # containerd redials a proxy with gRPC's backoff (at most 3 s apart in 1.6): until then
    # its calls fail with "connection refused".
    deadline = time.monotonic() + 15
    while (res := ctrd.ctr("snapshots", *SN, "ls", check=False)).returncode and time.monotonic() < deadline:
        time.sleep(0.2)
    ls = res.stdout
    assert "long" in ls and ls.count("Committed") == 3 and "Active" in ls
    assert sh("cat /state").split() == ["before", "after"]
    ctrd.ctr("tasks", "kill", "-s", "SIGKILL", "long")
    for _ in range(100):
        if ctrd.ctr("tasks", "delete", "long", check=False).returncode == 0:
            break
        time.sleep(0.1)
    ctrd.ctr("containers", "delete", "long")
    _assert_nothing_left(snap, ctrd)
