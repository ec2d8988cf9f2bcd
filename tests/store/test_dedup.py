"""File-level dedup across layers and `strata system df`: two images sharing most files,
by hard links on ext4 and by reflinks on an XFS loop mount."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from images import dedup
from images.store import Store
from tests.store.helpers import overlay, snapshot

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

    before_df = json.loads(strata("system", "df", "--format", "json").out)
    assert before_df["layers"] == 2 and before_df["dedup_saved"] == 0
    assert before_df["layers_size"] == 2 * (SHARED * FILE_SIZE + 1000)
    assert before_df["layers_on_disk"] >= before_df["layers_size"]

    out = strata("system", "dedup").out
    assert out.startswith(f"shared {SHARED - 1} files (hardlinks)")
    usage = json.loads(strata("system", "df", "--format", "json").out)
    assert usage["dedup_saved"] == (SHARED - 1) * FILE_SIZE
    assert usage["layers_on_disk"] == before_df["layers_on_disk"] - usage["dedup_saved"]
    assert _views(store, tmp_path) == before  # same trees, directory times included
    table = strata("system", "df").out
    assert "DEDUP SAVED" in table and "Layers" in table

    # Idempotent; removing one image leaves the other whole.
    assert strata("system", "dedup").out.startswith("shared 0 files")
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


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A small XFS (reflink=1) on a loop device: where dedup clones instead of linking."""
    if shutil.which("mkfs.xfs") is None:
        pytest.fail("mkfs.xfs missing: `make test` installs Debian's xfsprogs")
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_reflinks_share_data_but_nothing_a_container_sees(xfs: Path, tmp_path: Path) -> None:
    store = Store(xfs / "state")
    libs = [os.urandom(FILE_SIZE) for _ in range(SHARED)]
    a = _rootfs(tmp_path / "a", b"A", libs)
    b = _rootfs(tmp_path / "b", b"B", libs)
    os.chmod(b / "usr" / "lib" / "lib0.so", 0o600)  # other metadata: reflinks share anyway
    os.chown(b / "usr" / "lib" / "lib1.so", 1000, 1000)
    os.utime(b / "usr" / "lib" / "lib2.so", (1_000_000_000, 1_000_000_000))
    os.setxattr(b / "usr" / "lib" / "lib3.so", "user.mine", b"b")
    store.import_rootfs(a, "distro:a")
    store.import_rootfs(b, "distro:b")
    before = _full_views(store, tmp_path)
    assert dedup.disk_usage(store)["dedup_saved"] == 0

    result = dedup.deduplicate(store)
    assert (result.method, result.files_linked, result.bytes_saved) == ("reflink", SHARED, SHARED * FILE_SIZE)
    assert dedup.disk_usage(store)["dedup_saved"] == SHARED * FILE_SIZE
    assert _full_views(store, tmp_path) == before  # link counts, owners, modes, xattrs: all as they were
    assert dedup.deduplicate(store).files_linked == 0

    store.remove("distro:a")
    assert _full_views(store, tmp_path) == {k: v for k, v in before.items() if k == store.resolve("distro:b")}


def _full_views(store: Store, tmp_path: Path) -> dict[str, dict[str, tuple[Any, ...]]]:
    out = {}
    for img in store.images():
        with overlay(tmp_path / "m", img.lowerdirs) as m:
            out[img.id] = snapshot(m)
    return out
