"""The floor's file primitives every package uses: tree removal (common.tree:
deeper than Python's stack, never through a symlink, a bounded number of fds)
and the atomic write (common.atomic)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.atomic import write_atomic
from common.tree import remove_path


def _deep(root: Path, depth: int, canary: Path) -> None:
    root.mkdir()
    cur = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            for sub in ("d", "e"):
                os.mkdir(sub, dir_fd=cur)
            os.symlink(str(canary.parent), "out", dir_fd=cur)
            os.link(canary, "hard", dst_dir_fd=cur)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)


def test_removes_a_5000_level_tree_and_nothing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary"
    canary.write_text("keep\n")
    _deep(tmp_path / "deep", 5000, canary)
    fds_before = len(os.listdir("/proc/self/fd"))
    remove_path(tmp_path / "deep")
    assert not (tmp_path / "deep").exists()
    assert canary.read_text() == "keep\n" and sorted(os.listdir(outside)) == ["canary"]
    assert os.stat(canary).st_nlink == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_symlink_or_a_missing_path_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (target / "f").write_text("x")
    (tmp_path / "link").symlink_to(target)
    remove_path(tmp_path / "link")
    assert not (tmp_path / "link").is_symlink() and (target / "f").exists()
    remove_path(tmp_path / "missing")
    remove_path(tmp_path / "nodir" / "missing")


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["state.json"]
    assert os.stat(target).st_mode & 0o777 == 0o600
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing-dir" / "x", b"data")
    assert os.listdir(tmp_path) == ["state.json"]
