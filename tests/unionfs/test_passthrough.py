"""FUSE passthrough: files in the upper layer, and every file of a read-only
mount, are read and written by the kernel directly; lower files of a writable
mount keep going through strata, so a copy-up still moves every open file.

Whether the kernel passes an open through is seen by what only passthrough
does: a change made to the backing file behind the mount's back shows at once
through a file opened before it (the kernel reads the backing file), where
strata's own answers would come from the page cache it filled on the first
read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .support import layer_dirs, mounted


def _passes_through(view: Path, backing: Path) -> bool:
    """Whether reads of `view` go to `backing` itself: read, change the backing
    file in place, read again through the same open file (pread: no stat that
    could make the kernel drop its cached pages)."""
    fd = os.open(view, os.O_RDONLY)
    try:
        before = os.pread(fd, 4096, 0)
        with open(backing, "r+b") as b:
            b.write(b"X")
        after = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    with open(backing, "r+b") as b:
        b.write(before[:1])  # as it was
    return after[:1] == b"X" and before[:1] != b"X"


def test_upper_files_pass_through_lower_files_do_not(tmp_path: Path) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "low").write_bytes(b"lower data\n")
    with mounted("strata", lowers, upper, work, mnt):
        (mnt / "new").write_bytes(b"upper data\n")
        assert _passes_through(mnt / "new", upper / "new")
        assert not _passes_through(mnt / "low", lowers[0] / "low")
        # Written through the kernel straight into the upper file; size and data seen by all.
        with open(mnt / "new", "ab") as f:
            f.write(b"more\n")
        assert (mnt / "new").stat().st_size == len(b"upper data\nmore\n")
        assert (upper / "new").read_bytes() == b"upper data\nmore\n"


def test_a_read_only_mount_passes_everything_through(tmp_path: Path) -> None:
    lowers, _, _, mnt = layer_dirs(tmp_path, 2)
    (lowers[1] / "f").write_bytes(b"bottom\n")
    with mounted("strata", lowers, None, None, mnt):
        assert _passes_through(mnt / "f", lowers[1] / "f")


def test_passthrough_0_serves_every_read_itself(tmp_path: Path) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    with mounted("strata", lowers, upper, work, mnt, extra="passthrough=0"):
        (mnt / "new").write_bytes(b"upper data\n")
        assert not _passes_through(mnt / "new", upper / "new")


def test_an_inode_open_through_strata_stays_so_until_closed(tmp_path: Path) -> None:
    """A lower file open for reading, then copied up by a writer: opens made
    while the first is still open go through strata too (the kernel refuses a
    passthrough open beside a cached one); once all are closed, the copy passes
    through. Nobody gets EIO, everybody reads the newest data."""
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "f").write_bytes(b"lower\n")
    with mounted("strata", lowers, upper, work, mnt):
        with open(mnt / "f", "rb", buffering=0) as reader:
            assert reader.read() == b"lower\n"
            with open(mnt / "f", "wb") as writer:
                writer.write(b"upper\n")
            with open(mnt / "f", "rb") as again:
                assert again.read() == b"upper\n"
            reader.seek(0)
            assert reader.read() == b"upper\n"
        assert _passes_through(mnt / "f", upper / "f")


def test_bad_passthrough_value_is_one_line(tmp_path: Path) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    with pytest.raises(AssertionError, match="passthrough=maybe: expected 0 or 1"), \
            mounted("strata", lowers, upper, work, mnt, extra="passthrough=maybe"):
        pass
    assert not os.path.ismount(mnt)


def test_passthrough_0_lets_a_kernel_overlayfs_stack_on_the_mount(tmp_path: Path) -> None:
    """With passthrough the mount is a stacked filesystem and the kernel's two-level
    limit refuses an overlayfs on it (as README says); passthrough=0 allows it."""
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "f").write_text("lower\n")
    top = tmp_path / "top"
    for d in ("up", "work", "mnt"):
        (top / d).mkdir(parents=True)
    with mounted("strata", lowers, upper, work, mnt, extra="passthrough=0"), \
            mounted("kernel", [mnt], top / "up", top / "work", top / "mnt"):
        assert (top / "mnt" / "f").read_text() == "lower\n"
