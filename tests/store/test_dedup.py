"""File-level dedup across layers and `strata system df`: two images sharing most files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.store.helpers import overlay, snapshot
from unionfs import dedup
from unionfs.store import Store

FILE_SIZE = 64 * 1024
SHARED = 40


def _rootfs(root: Path, extra: bytes, seed_files: list[bytes]) -> Path:
    (root / "usr" / "lib").mkdir(parents=True)
    for i, data in enumerate(seed_files):
        p = root / "usr" / "lib" / f"lib{i}.so"
        p.write_bytes(data)
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    (root / "etc").mkdir()
    (root / "etc" / "own").write_bytes(extra * 1000)
    return root


def _views(store: Store, tmp_path: Path) -> dict[str, dict[str, tuple[Any, ...]]]:
    """Each image's merged view, link counts left out (sharing an inode is the point)."""
    out = {}
    for img in store.images():
        with overlay(tmp_path / "m", img.lowerdirs) as m:
            out[img.id] = {k: v[:-1] for k, v in snapshot(m).items()}
    return out


def test_two_images_sharing_most_files(store: Store, strata: Callable[..., Any], tmp_path: Path) -> None:
    libs = [os.urandom(FILE_SIZE) for _ in range(SHARED)]
    a = _rootfs(tmp_path / "a", b"A", libs)
    b = _rootfs(tmp_path / "b", b"B", libs)
    os.chmod(b / "usr" / "lib" / "lib0.so", 0o600)  # same bytes, other mode: must stay apart
    strata("import", str(a), "distro:a")
    strata("import", str(b), "distro:b")
    before = _views(store, tmp_path)

    usage = json.loads(strata("system", "df", "--format", "json").out)
    assert usage["layers"] == 2 and usage["dedup_saved"] == 0
    assert usage["layers_size"] == usage["layers_on_disk"] == 2 * (SHARED * FILE_SIZE + 1000)

    out = strata("system", "dedup").out
    assert out.startswith(f"linked {SHARED - 1} files")
    usage = json.loads(strata("system", "df", "--format", "json").out)
    assert usage["dedup_saved"] == (SHARED - 1) * FILE_SIZE
    assert usage["layers_on_disk"] == usage["layers_size"] - usage["dedup_saved"]
    assert _views(store, tmp_path) == before  # same trees, directory times included
    table = strata("system", "df").out
    assert "DEDUP SAVED" in table and "Layers" in table

    # Idempotent; removing one image leaves the other whole.
    assert strata("system", "dedup").out.startswith("linked 0 files")
    strata("rmi", "distro:a")
    after = _views(store, tmp_path)
    assert list(after.values()) == [v for k, v in before.items() if k in after]
    assert json.loads(strata("system", "df", "--format", "json").out)["dedup_saved"] == 0


def test_equal_hashes_are_not_trusted_without_comparing_bytes(
    store: Store, strata: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _rootfs(tmp_path / "a", b"A", [os.urandom(FILE_SIZE)])
    b = _rootfs(tmp_path / "b", b"B", [os.urandom(FILE_SIZE)])
    strata("import", str(a), "one")
    strata("import", str(b), "two")
    before = _views(store, tmp_path)
    monkeypatch.setattr(dedup, "_content_hash", lambda path: "collision")
    assert dedup.deduplicate(store).files_linked == 0
    assert _views(store, tmp_path) == before
