"""Unit tests of strata-unionfs's parts that need no mount and no root: the
option table, anchored lookup through a layer stack, the inode table, copy-up
of one file, and the README's option table against the parser's."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from common.errors import StrataError
from unionfs import options
from unionfs.copyup import WorkDir, copy_data, copy_up
from unionfs.inodes import InodeTable
from unionfs.layers import LayerStack

README = Path(__file__).resolve().parents[2] / "README.md"


# ---- options -------------------------------------------------------------------------------

def test_podman_and_mount_helper_strings() -> None:
    o = options.parse(["lowerdir=/a\\:b:/c,upperdir=/u,workdir=/w,,volatile,", "rw,nodev,noatime,xino=off"])
    assert o.lowerdirs == ["/a:b", "/c"] and (o.upperdir, o.workdir) == ("/u", "/w")
    assert o.volatile and not o.fsync
    assert o.kernel_flags == ["rw", "nodev", "noatime"]
    ro = options.parse(["lowerdir=/a,ro,squash_to_root,uidmapping=0:1000:1,redirect_dir=off,spin=0"])
    assert ro.readonly and ro.squash_to_uid == 0 and not ro.redirect_dir and ro.spin_us == 0
    assert ro.uidmapping is not None and ro.uidmapping.to_inside(1000) == 0


@pytest.mark.parametrize("text,message", [
    ("upperdir=/u,workdir=/w", "no lowerdir= given"),
    ("lowerdir=/a,upperdir=/u", "upperdir= and workdir= go together"),
    ("lowerdir=/a,bogus", "unknown option: bogus"),
    ("lowerdir=/a,volatile=1", "unknown option: volatile"),
    ("lowerdir=/a,timeout=-1", "timeout=-1: expected seconds >= 0"),
    ("lowerdir=/a,spin=2000000", "spin=2000000: at most 1000000 microseconds"),
    ("lowerdir=/a,fsync=maybe", "fsync=maybe: expected 0 or 1"),
    ("lowerdir=/a::/b", "lowerdir=/a::/b: empty layer path"),
    ("lowerdir=/a,uidmapping=0:1", "uidmapping=0:1: expected inside:outside:count triples"),
])
def test_bad_options_get_one_line(text: str, message: str) -> None:
    with pytest.raises(StrataError, match=f"^{message.replace('(', '.').replace(')', '.')}$"):
        options.parse([text])


def test_readme_option_table_is_the_parsers() -> None:
    assert options.markdown_table() in README.read_text()


# ---- layers ----------------------------------------------------------------------------------

def _stack(tmp_path: Path) -> tuple[LayerStack, InodeTable, Path, Path, Path]:
    upper, top, bottom = (tmp_path / n for n in ("upper", "top", "bottom"))
    for d in (upper, top, bottom):
        d.mkdir()
    (bottom / "d").mkdir()
    (bottom / "d/old").write_text("old")
    (bottom / "d/gone").write_text("gone")
    (bottom / "f").write_text("bottom")
    (top / "d").mkdir()
    (top / "d/.wh.gone").touch()
    (top / "d/new").write_text("new")
    (top / "o").mkdir()
    os.setxattr(top / "o", "user.overlay.opaque", b"y")
    (bottom / "o").mkdir()
    (bottom / "o/hidden").touch()
    (upper / "u").write_text("upper")
    stack = LayerStack(str(upper), [str(top), str(bottom)])
    return stack, InodeTable(stack, stack.root_entry()), upper, top, bottom


def test_lookup_and_listing_merge_as_overlayfs(tmp_path: Path) -> None:
    stack, table, _, _, _ = _stack(tmp_path)
    root = table.root
    assert sorted(stack.listing(table.view(root))) == ["d", "f", "o", "u"]
    d = stack.child(table.view(root), "d")
    assert d is not None and d.is_dir and [layer for layer, _ in d.lowers] == [1, 2]
    dnode = table.attach(root, "d", d)
    assert sorted(stack.listing(table.view(dnode))) == ["new", "old"]
    assert stack.child(table.view(dnode), "gone") is None
    assert stack.child(table.view(dnode), ".wh.gone") is None
    o = stack.child(table.view(root), "o")
    assert o is not None and [layer for layer, _ in o.lowers] == [1]
    f = stack.child(table.view(root), "f")
    assert f is not None and f.layer == 2


def test_a_directory_swapped_for_a_symlink_is_stale_not_followed(tmp_path: Path) -> None:
    stack, table, _, _, bottom = _stack(tmp_path)
    d = stack.child(table.view(table.root), "d")
    assert d is not None
    dnode = table.attach(table.root, "d", d)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "old").write_text("secret")
    (bottom / "d").rename(bottom / "d.moved")
    (bottom / "d").symlink_to(outside)
    with pytest.raises(OSError) as e:
        table.dirfd(dnode, 2)
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.ESTALE)


# ---- inodes ----------------------------------------------------------------------------------

def test_numbers_come_from_the_backing_inode_and_survive_a_new_table(tmp_path: Path) -> None:
    stack, table, upper, _, bottom = _stack(tmp_path)
    f = stack.child(table.view(table.root), "f")
    u = stack.child(table.view(table.root), "u")
    assert f is not None and u is not None
    assert table.attach(table.root, "f", f).ino == os.stat(bottom / "f").st_ino
    assert table.attach(table.root, "u", u).ino == os.stat(upper / "u").st_ino
    again = InodeTable(stack, stack.root_entry())
    assert again.number(u.st) == os.stat(upper / "u").st_ino


def test_hard_link_aliases_follow_renames_and_removals(tmp_path: Path) -> None:
    stack, table, upper, _, _ = _stack(tmp_path)
    (upper / "e").mkdir()
    os.link(upper / "u", upper / "e/f")
    root = table.root
    e = stack.child(table.view(root), "e")
    assert e is not None
    enode = table.attach(root, "e", e)
    u = stack.child(table.view(root), "u")
    f = stack.child(table.view(enode), "f")
    assert u is not None and f is not None
    node = table.attach(root, "u", u)
    assert table.attach(enode, "f", f) is node and node.aliases == [(enode, "f")]
    table.moved(enode, root, "e", root, "e2")  # the directory holding the alias moves
    table.removed(node, root, "u")
    assert (node.parent, node.name, node.unlinked) == (enode, "f", False)
    table.removed(node, enode, "f")
    assert node.unlinked


# ---- copy-up ---------------------------------------------------------------------------------

def test_copy_keeps_holes_metadata_and_xattrs(tmp_path: Path) -> None:
    src, dst, wd = tmp_path / "src", tmp_path / "dst", tmp_path / "wd"
    for d in (src, dst, wd):
        d.mkdir()
    f = src / "sparse"
    with open(f, "wb") as out:
        out.truncate(64 << 20)
        out.seek(32 << 20)
        out.write(b"middle")
    os.chmod(f, 0o640)
    os.setxattr(f, "user.k", b"v")
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    work = WorkDir(str(wd))
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = copy_up(work, sfd, "sparse", os.lstat(f), dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < (1 << 20)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime_ns == 2_000_000_000
    assert os.getxattr(dst / "sparse", "user.k") == b"v"
    with open(dst / "sparse", "rb") as g:
        g.seek(32 << 20)
        assert g.read(6) == b"middle"
    assert os.listdir(wd / "work") == []


def test_copy_data_of_a_file_that_is_all_hole(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with open(a, "wb") as out:
        out.truncate(1 << 20)
    with open(a, "rb") as s, open(b, "wb") as d:
        copy_data(s.fileno(), d.fileno(), 1 << 20)
    assert os.stat(b).st_size == 1 << 20 and os.stat(b).st_blocks == 0


def test_a_source_replaced_after_lookup_is_stale(tmp_path: Path) -> None:
    src, dst, wd = tmp_path / "src", tmp_path / "dst", tmp_path / "wd"
    for d in (src, dst, wd):
        d.mkdir()
    (src / "f").write_text("looked up")
    st = os.lstat(src / "f")
    (src / "f").unlink()
    (src / "f").symlink_to(tmp_path / "outside")
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as e:
            copy_up(WorkDir(str(wd)), sfd, "f", st, dfd)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert e.value.errno in (errno.ELOOP, errno.ESTALE)
    assert os.listdir(dst) == [] and os.listdir(wd / "work") == []
