"""The snapshot store on its own (plugin_api.snapshot_store): containerd's snapshot model,
its errors, crash leftovers and hostile keys and labels, on a real directory."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from common import kernel
from common.errors import StrataError
from plugin_api import snapshot_store as st
from plugin_api.filters import FilterError, parse
from runtime.cli import build_parser
from unionfs import client


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = st.SnapshotStore(tmp_path / "snap")
    yield s
    s.close()


def _dir(store: st.SnapshotStore, key: str) -> Path:
    (id_,) = store._db.execute("SELECT id FROM snapshots WHERE key = ?", (key,)).fetchone()
    return store.snapshots / str(id_)


def test_layer_chain_mounts_and_kinds(store: st.SnapshotStore) -> None:
    (m,) = store.prepare("a", "", {"l": "1"})
    assert m.type == "bind" and "rw" in m.options and m.source.endswith("/fs")
    (Path(m.source) / "base").write_text("base")
    store.commit("A", "a", {"containerd.io/gc.root": "x"})
    with pytest.raises(st.NotFound):
        store.stat("a")
    info = store.stat("A")
    assert (info.kind, info.parent, info.labels) == (st.COMMITTED, "", {"containerd.io/gc.root": "x"})
    (m,) = store.prepare("b", "A", {})
    assert m.type == "fuse3.strata-unionfs" and m.source == "strata"
    lower = str(_dir(store, "A") / "fs")
    assert m.options == [f"lowerdir={lower}", f"upperdir={_dir(store, 'b') / 'fs'}",
                         f"workdir={_dir(store, 'b') / 'work'}"]
    store.commit("B", "b", {})
    (v,) = store.prepare("v1", "A", {}, view=True)  # one layer: a read-only bind
    assert (v.type, v.source, v.options) == ("bind", lower, ["ro", "rbind"])
    (v,) = store.prepare("v2", "B", {}, view=True)  # more: a read-only union, no upper
    assert v.type == "fuse3.strata-unionfs" and v.options[0] == "ro"
    assert v.options[1] == f"lowerdir={_dir(store, 'B') / 'fs'}:{lower}" and len(v.options) == 2
    assert store.stat("v2").kind == st.VIEW and store.stat("v2").parent == "B"
    assert store.mounts("v2") == [v]
    assert store.usage("A").inodes == 1 and store.usage("A").size > 0
    assert [i.name for i in store.walk()] == ["A", "B", "v1", "v2"]


def test_errors_are_the_ones_containerd_expects(store: st.SnapshotStore) -> None:
    store.prepare("a", "", {})
    with pytest.raises(st.AlreadyExists):
        store.prepare("a", "", {})
    with pytest.raises(st.NotFound):
        store.prepare("b", "missing", {})
    with pytest.raises(st.InvalidArgument):  # a parent must be committed
        store.prepare("b", "a", {})
    store.commit("A", "a", {})
    store.prepare("view", "A", {}, view=True)
    with pytest.raises(st.FailedPrecondition):
        store.commit("V", "view", {})
    with pytest.raises(st.FailedPrecondition):
        store.commit("AA", "A", {})
    with pytest.raises(st.FailedPrecondition):
        store.mounts("A")
    store.prepare("c", "A", {})
    with pytest.raises(st.AlreadyExists):
        store.commit("A", "c", {})
    with pytest.raises(st.FailedPrecondition):  # it has children
        store.remove("A")
    for missing in (store.stat, store.mounts, store.remove, store.usage):
        with pytest.raises(st.NotFound):
            missing("nope")
    with pytest.raises(st.NotFound):
        store.commit("x", "nope", {})
    with pytest.raises(st.NotFound):
        store.update("nope", {}, [])


def test_update_labels_by_mask(store: st.SnapshotStore) -> None:
    store.prepare("a", "", {"keep": "1", "drop": "2"})
    assert store.update("a", {"new": "3"}, ["labels.new", "labels.drop"]).labels == {"keep": "1", "new": "3"}
    assert store.update("a", {"only": "x"}, []).labels == {"only": "x"}
    assert store.update("a", {"z": "y"}, ["labels"]).labels == {"z": "y"}
    before = store.stat("a")
    with pytest.raises(st.InvalidArgument):
        store.update("a", {}, ["parent"])
    assert store.stat("a") == before


def test_walk_filters(store: st.SnapshotStore) -> None:
    store.prepare("a", "", {"containerd.io/gc.root": "yes", "tier": "base"})
    store.commit("A", "a", {"containerd.io/gc.root": "yes", "tier": "base"})
    store.prepare("b", "A", {"tier": "app"})
    store.prepare("v", "A", {}, view=True)

    def names(*filters: str) -> list[str]:
        return [i.name for i in store.walk(filters)]

    assert names() == ["A", "b", "v"]
    assert names("kind==active") == ["b"]
    assert names("kind==view", "kind==committed") == ["A", "v"]
    assert names("parent==A,kind!=view") == ["b"]
    assert names('labels."containerd.io/gc.root"') == ["A"]
    assert names("labels.tier==app") == ["b"]
    assert names('labels.tier~="^ba"') == ["A"]
    assert names("labels.tier!=base") == ["b", "v"]
    assert names('name=="A"') == ["A"]
    for bad in ("kind==", "labels.", "kind==x,", '"open', "a~=(", "kind=!x"):
        with pytest.raises(st.InvalidArgument):
            names(bad)


def test_filter_syntax() -> None:
    (s,) = parse(r'labels."a\"b".c==" v,1 "')
    assert (s.path, s.operator, s.value) == (("labels", 'a"b', "c"), "==", " v,1 ")
    with pytest.raises(FilterError):
        parse("x" * 5000)


def test_remove_deletes_contents_and_cleanup_takes_leftovers(store: st.SnapshotStore) -> None:
    (m,) = store.prepare("a", "", {})
    d = _dir(store, "a")
    # A tree a container may leave: a symlink out of the layer must be removed, not followed.
    outside = store.root.parent / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    os.symlink(outside, Path(m.source) / "escape")
    os.makedirs(Path(m.source) / "deep" / "er")
    store.remove("a")
    assert not d.exists() and (outside / "keep").exists()
    # What a crash leaves: directories without a row (a prepare whose transaction never
    # committed, a removal that never finished); cleanup deletes exactly those.
    store.prepare("b", "", {})
    (store.snapshots / "999").mkdir()
    (store.snapshots / "999" / "fs").mkdir()
    (store.snapshots / "junk").write_text("x")
    assert sorted(store.cleanup()) == ["999", "junk"]
    assert sorted(os.listdir(store.snapshots)) == [_dir(store, "b").name]


def test_state_survives_reopening_and_is_root_only(tmp_path: Path) -> None:
    s = st.SnapshotStore(tmp_path / "snap")
    s.prepare("a", "", {"k": "v"})
    s.commit("A", "a", {"k": "v"})
    s.prepare("b", "A", {})
    s.close()
    s = st.SnapshotStore(tmp_path / "snap")
    try:
        listing = [(i.name, i.parent, i.kind) for i in s.walk()]
        assert listing == [("A", "", st.COMMITTED), ("b", "A", st.ACTIVE)]
        assert s.stat("A").labels == {"k": "v"}
        assert os.stat(tmp_path / "snap").st_mode & 0o777 == 0o700
        assert os.stat(s.snapshots).st_mode & 0o777 == 0o700
        assert os.stat(tmp_path / "snap" / "metadata.db").st_mode & 0o777 == 0o600
        assert os.stat(_dir(s, "b")).st_mode & 0o777 == 0o700
        assert os.stat(_dir(s, "b") / "fs").st_mode & 0o777 == 0o755
        # the database is an ordinary SQLite file another tool can read
        db = sqlite3.connect(tmp_path / "snap" / "metadata.db")
        assert db.execute("SELECT count(*) FROM snapshots").fetchone() == (2,)
        db.close()
    finally:
        s.close()


@pytest.mark.parametrize("key", ["", "x\0y", "k" * 5000])
def test_hostile_keys_refused_before_anything_changes(store: st.SnapshotStore, key: str) -> None:
    with pytest.raises(st.InvalidArgument):
        store.prepare(key, "", {})
    with pytest.raises(st.InvalidArgument):
        store.stat(key)
    assert list(store.walk()) == [] and os.listdir(store.snapshots) == []


def test_keys_are_never_paths(store: st.SnapshotStore) -> None:
    keys = ["../../etc", "/abs/path", "a/b/../../c", ".", "..", "sha256:" + "f" * 64, "ns/12/ünïcode ☃"]
    for k in keys:
        (m,) = store.prepare(k, "", {"../x": "/etc/passwd"})
        assert Path(m.source).parent.parent == store.snapshots
    assert sorted(os.listdir(store.snapshots)) == sorted(str(i) for i in range(1, len(keys) + 1))
    assert [i.name for i in store.walk()] == keys


@pytest.mark.parametrize("labels", [
    {"k": "v" * 4096}, {"": "v"}, {"k": "a\0"}, {f"l{i}": "" for i in range(st.MAX_LABELS + 1)},
])
def test_hostile_labels_refused(store: st.SnapshotStore, labels: dict[str, str]) -> None:
    with pytest.raises(st.InvalidArgument):
        store.prepare("a", "", labels)
    assert list(store.walk()) == []
    store.prepare("a", "", {})
    with pytest.raises(st.InvalidArgument):
        store.update("a", labels, [])
    with pytest.raises(st.InvalidArgument):
        store.commit("A", "a", labels)
    assert store.stat("a").labels == {} and store.stat("a").kind == st.ACTIVE


def test_usage_counts_blocks_and_inodes_once(store: st.SnapshotStore) -> None:
    (m,) = store.prepare("a", "", {})
    fs = Path(m.source)
    (fs / "f").write_bytes(b"x" * 100_000)
    os.link(fs / "f", fs / "hard")
    (fs / "d").mkdir()
    os.symlink("/nonexistent", fs / "d" / "s")
    u = store.usage("a")
    assert u.inodes == 3 and 100_000 <= u.size < 200_000
    store.commit("A", "a", {})
    (fs / "late").write_text("changes after commit are not counted")  # commit stored the usage
    assert store.usage("A") == u


def test_a_root_mount_options_cannot_carry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StrataError, match="holds ','"):
        st.SnapshotStore(tmp_path / "a,b")
    assert not (tmp_path / "a,b").exists()


def test_root_from_either_place_on_the_command_line() -> None:
    parser = build_parser()
    assert parser.parse_args(["--root", "/x", "snapshotter"]).root == "/x"
    assert parser.parse_args(["snapshotter", "--root", "/y"]).root == "/y"


def _daemon_of(mountpoint: Path) -> int:
    """The pid of the strata-unionfs serving mountpoint."""
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(b"strata-unionfs" in a for a in argv) and str(mountpoint).encode() in argv:
                return int(p.name)
    raise AssertionError(f"no strata-unionfs serves {mountpoint}")


def test_premount_unions_follow_the_snapshots(tmp_path: Path) -> None:
    """--premount: the store mounts each union itself, mounts it again when its daemon died,
    and unmounts it before a commit, a removal, or the cleanup of a leftover directory."""
    s = st.SnapshotStore(tmp_path / "snap", premount=True)
    try:
        (m,) = s.prepare("a", "", {})
        assert m.type == "bind" and m.source.endswith("/fs")  # one layer: no union needed
        (Path(m.source) / "base").write_text("base\n")
        s.commit("A", "a", {})
        (m,) = s.prepare("b", "A", {"l": "1"})
        merged = Path(m.source)
        assert (m.type, merged.name, m.options) == ("bind", "merged", ["rw", "rbind"])
        assert client.alive(merged) and (merged / "base").read_text() == "base\n"
        (merged / "new").write_text("new\n")
        os.kill(_daemon_of(merged), signal.SIGKILL)
        for _ in range(100):
            if not client.alive(merged):
                break
            time.sleep(0.05)
        assert s.mounts("b") == [m]  # mounted again
        assert sorted(os.listdir(merged)) == ["base", "new"]
        s.commit("B", "b", {})
        assert not kernel.is_mountpoint(merged)
        assert s.usage("B").inodes == 1
        (v,) = s.prepare("v", "B", {}, view=True)
        assert v.options == ["ro", "rbind"] and sorted(os.listdir(v.source)) == ["base", "new"]
        with pytest.raises(OSError):
            (Path(v.source) / "x").write_text("read-only")
        s.remove("v")
        assert not kernel.is_mountpoint(v.source) and not Path(v.source).parent.exists()
        # A leftover with a live union (its row lost): cleanup unmounts before deleting, so
        # nothing is deleted through the union.
        (c,) = s.prepare("c", "B", {})
        s._db.execute("DELETE FROM snapshots WHERE key = 'c'")
        assert s.cleanup() == [Path(c.source).parent.name]
        assert not kernel.is_mountpoint(c.source) and not Path(c.source).parent.exists()
        assert sorted(os.listdir(s.snapshots / "2" / "fs")) == ["new"]  # B intact
    finally:
        s.close()
        for _, target, _, _ in kernel.mounts():
            if target.startswith(str(tmp_path)):
                client.unmount(target)
