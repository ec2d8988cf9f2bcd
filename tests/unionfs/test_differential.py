"""The same operations on kernel overlayfs and on strata-unionfs, over copies of
the same layers: the merged trees, the results of each call and the upper
dirs must be the same, and each upper must mount with the other filesystem
and show the same tree (interchange)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from .support import layer_dirs, mounted, snapshot

Op = Callable[[Path], object]


def build_layers(lowers: list[Path]) -> None:
    """Two lower layers in the kernel's own format (char 0/0 whiteouts, trusted.overlay.opaque)."""
    top, bottom = lowers
    (bottom / "dir/sub").mkdir(parents=True)
    (bottom / "dir/a.txt").write_text("bottom a\n")
    (bottom / "dir/b.txt").write_text("bottom b\n")
    (bottom / "dir/sub/deep.txt").write_text("deep\n")
    (bottom / "gone").write_text("whited out\n")
    (bottom / "odir").mkdir()
    (bottom / "odir/old").write_text("hidden by opaque\n")
    (bottom / "emptyd").mkdir()
    (bottom / "full").mkdir()
    for i in range(30):
        (bottom / f"full/f{i:02}").write_text(f"{i}\n" * i)
    (bottom / "big.bin").write_bytes(random.Random(7).randbytes(3 << 20))
    (bottom / "exe").write_text("#!/bin/sh\n")
    os.chmod(bottom / "exe", 0o4755)
    os.chown(bottom / "exe", 12, 34)
    (bottom / "link").symlink_to("dir/a.txt")
    (bottom / "hard1").write_text("linked\n")
    os.link(bottom / "hard1", bottom / "hard2")
    os.mkfifo(bottom / "fifo")
    os.setxattr(bottom / "dir/b.txt", "user.color", b"blue")
    os.utime(bottom / "dir/b.txt", (1_000_000, 2_000_000))
    (top / "dir").mkdir()
    (top / "dir/a.txt").write_text("top a\n")
    os.mknod(top / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (top / "odir").mkdir()
    os.setxattr(top / "odir", "trusted.overlay.opaque", b"y")
    (top / "odir/new").write_text("above opaque\n")


def _append(p: Path, data: str) -> None:
    with open(p, "a") as f:
        f.write(data)


OPS: list[tuple[str, Op]] = [
    ("create", lambda m: (m / "new.txt").write_text("new\n")),
    ("append lower", lambda m: _append(m / "dir/b.txt", "more\n")),
    ("overwrite lower", lambda m: (m / "dir/a.txt").write_text("replaced\n")),
    ("truncate lower", lambda m: os.truncate(m / "full/f10", 3)),
    ("truncate big", lambda m: os.truncate(m / "big.bin", 1 << 20)),
    ("unlink lower", lambda m: os.unlink(m / "full/f01")),
    ("unlink whited", lambda m: os.unlink(m / "gone")),
    ("unlink upper", lambda m: os.unlink(m / "new.txt")),
    ("rmdir lower empty", lambda m: os.rmdir(m / "emptyd")),
    ("rmdir non-empty", lambda m: os.rmdir(m / "full")),
    ("mkdir over whiteout", lambda m: os.mkdir(m / "emptyd", 0o750)),
    ("file in new opaque", lambda m: (m / "emptyd/inside").write_text("x\n")),
    ("rename file", lambda m: os.rename(m / "full/f02", m / "full/renamed")),
    ("rename over lower", lambda m: os.rename(m / "full/f03", m / "full/f04")),
    ("rename across dirs", lambda m: os.rename(m / "full/f05", m / "dir/moved")),
    ("rename onto whiteout", lambda m: os.rename(m / "full/f06", m / "full/f01")),
    ("chmod lower", lambda m: os.chmod(m / "full/f07", 0o600)),
    ("chown lower", lambda m: os.chown(m / "full/f08", 1000, 1000)),
    ("utime lower", lambda m: os.utime(m / "full/f09", (5, 6))),
    ("setxattr lower", lambda m: os.setxattr(m / "full/f11", "user.k", b"v")),
    ("removexattr lower", lambda m: os.removexattr(m / "dir/b.txt", "user.color")),
    ("removexattr missing", lambda m: os.removexattr(m / "full/f12", "user.none")),
    ("link lower", lambda m: os.link(m / "full/f13", m / "full/f13.link")),
    ("symlink", lambda m: os.symlink("../dir", m / "full/sym")),
    ("mkfifo", lambda m: os.mkfifo(m / "full/pipe")),
    ("mknod", lambda m: os.mknod(m / "full/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))),
    ("mkdir", lambda m: os.mkdir(m / "newdir")),
    ("mkdir exists", lambda m: os.mkdir(m / "dir")),
    ("rename new dir", lambda m: os.rename(m / "newdir", m / "newdir2")),
    ("rename dir over empty", lambda m: os.rename(m / "newdir2", m / "emptyd2") if os.mkdir(m / "emptyd2")
     is None else None),
    ("rm -rf lower tree", lambda m: shutil.rmtree(m / "dir/sub")),
    ("unlink opaque child", lambda m: os.unlink(m / "odir/new")),
    ("rmdir opaque", lambda m: os.rmdir(m / "odir")),
    ("write hardlink", lambda m: _append(m / "hard1", "via one\n")),
    ("chmod symlink target", lambda m: os.chmod(m / "link", 0o640)),
    ("o_excl on lower", lambda m: os.close(os.open(m / "exe", os.O_CREAT | os.O_EXCL | os.O_WRONLY))),
    ("unlink dir", lambda m: os.unlink(m / "dir")),
    ("rmdir file", lambda m: os.rmdir(m / "exe")),
    ("rename into self", lambda m: os.rename(m / "emptyd", m / "emptyd/inside2")),
]


def run_ops(mnt: Path) -> list[tuple[str, object]]:
    results: list[tuple[str, object]] = []
    for name, op in OPS:
        try:
            op(mnt)
            results.append((name, "ok"))
        except OSError as e:
            results.append((name, errno.errorcode.get(e.errno or 0, e.errno)))
    return results


def listing(mnt: Path) -> dict[str, list[str]]:
    return {str(Path(d).relative_to(mnt)): sorted(dirs + files) for d, dirs, files in os.walk(mnt)}


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, tuple[list[Path], Path, Path, Path]]:
    setups = {}
    for kind in ("kernel", "strata"):
        setups[kind] = layer_dirs(tmp_path / kind, 2)
        build_layers(setups[kind][0])
    return setups


def test_same_results_trees_and_uppers(pair: dict[str, tuple[list[Path], Path, Path, Path]]) -> None:
    seen = {}
    for kind, (lowers, upper, work, mnt) in pair.items():
        with mounted(kind, lowers, upper, work, mnt):
            before = snapshot(mnt)
            results = run_ops(mnt)
            seen[kind] = (before, results, snapshot(mnt), listing(mnt))
        seen[kind] += (snapshot(upper, upper_format=True),)
    k, s = seen["kernel"], seen["strata"]
    assert s[0] == k[0], "the merged view of the untouched layers differs"
    assert s[1] == k[1], "calls answered differently"
    assert s[2] == k[2], "merged trees differ after the operations"
    assert s[3] == k[3], "directory listings differ"
    assert s[4] == k[4], "upper dirs differ"


def test_interchange(pair: dict[str, tuple[list[Path], Path, Path, Path]]) -> None:
    """An upper written by one filesystem shows the same tree through the other."""
    for writer, reader in (("strata", "kernel"), ("kernel", "strata")):
        lowers, upper, work, mnt = pair[writer]
        with mounted(writer, lowers, upper, work, mnt):
            run_ops(mnt)
            written = snapshot(mnt)
        shutil.rmtree(work)
        work.mkdir()
        with mounted(reader, lowers, upper, work, mnt):
            assert snapshot(mnt) == written, f"{writer}'s upper looks different through {reader}"


def test_lower_dir_rename_works_where_kernel_says_exdev(
        pair: dict[str, tuple[list[Path], Path, Path, Path]]) -> None:
    lowers, upper, work, mnt = pair["kernel"]
    with mounted("kernel", lowers, upper, work, mnt), pytest.raises(OSError) as exc:
        os.rename(mnt / "dir", mnt / "dir2")
    assert exc.value.errno == errno.EXDEV
    lowers, upper, work, mnt = pair["strata"]
    with mounted("strata", lowers, upper, work, mnt):
        before = snapshot(mnt / "dir")
        ino = os.stat(mnt / "dir/b.txt").st_ino
        os.rename(mnt / "dir", mnt / "dir2")
        assert not (mnt / "dir").exists()
        assert snapshot(mnt / "dir2") == before
        assert os.stat(mnt / "dir2/b.txt").st_ino == ino
        assert sorted(os.listdir(mnt / "dir2")) == ["a.txt", "b.txt", "sub"]
        os.mkdir(mnt / "dir")
        assert os.listdir(mnt / "dir") == [], "the old lower content must not come back"
        after = snapshot(mnt)
    with mounted("kernel", lowers, upper, work, mnt):
        assert snapshot(mnt) == after, "the renamed tree must look the same through the kernel"
