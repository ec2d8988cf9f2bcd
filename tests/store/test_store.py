"""The layer store: ChainIDs, one copy per shared layer, reference counting on rmi,
all-or-nothing adds, commit of an upper, and the image CLI verbs."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.errors import StrataError
from images.digest import chain_ids, sha256_bytes
from images.store import LayerSource, Store
from tests.store.helpers import TarBuilder, overlay, snapshot


def _source(data: bytes, digest: str | None = None) -> LayerSource:
    return LayerSource(lambda: io.BytesIO(data), digest, len(data))  # type: ignore[arg-type,return-value]


def _config(*tars: bytes) -> bytes:
    diff_ids = [sha256_bytes(t) for t in tars]
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids},
                       "history": [{"created_by": f"layer {i}"} for i in range(len(tars))]}).encode()


BASE = TarBuilder().dir("etc").file("etc/os-release", b"ID=strata\n").file("shared", b"s" * 5000).bytes()
TOP1 = TarBuilder().file("one", b"1").file(".wh.shared", b"").bytes()
TOP2 = TarBuilder().file("two", b"2").dir("etc").file("etc/.wh..wh..opq", b"").bytes()


def _contents(store: Store) -> tuple[int, int, int]:
    return tuple(len(os.listdir(d)) for d in (store.layers_dir, store.blobs_dir, store.images_dir))  # type: ignore[return-value]


def test_chain_ids_follow_the_spec() -> None:
    a, b, c = (sha256_bytes(x) for x in (b"a", b"b", b"c"))
    ab = sha256_bytes(f"{a} {b}".encode())
    assert chain_ids([a, b, c]) == [a, ab, sha256_bytes(f"{ab} {c}".encode())]


def test_shared_layer_stored_once_and_rmi_frees_exactly_the_unused(store: Store) -> None:
    id1 = store.add_image(_config(BASE, TOP1), [_source(gzip.compress(BASE)), _source(TOP1)], ["img1"])
    id2 = store.add_image(_config(BASE, TOP2), [_source(BASE), _source(TOP2)], ["img2:v2"])
    img1, img2 = store.image(id1), store.image(id2)
    assert img1.layers[0].chain_id == img2.layers[0].chain_id == sha256_bytes(BASE)
    assert img1.layers[1].chain_id == chain_ids([sha256_bytes(BASE), sha256_bytes(TOP1)])[1]
    assert _contents(store) == (3, 3 + 2, 2)  # 3 layer blobs + 2 configs
    assert store.resolve("img1") == store.resolve("img1:latest") == store.resolve(id1[7:19]) == id1

    # The layers are lowerdirs: the kernel's merged view is the image.
    with overlay(store.root.parent / "m", img2.lowerdirs) as m:
        assert sorted(os.listdir(m)) == ["etc", "shared", "two"] and os.listdir(m / "etc") == []
    with overlay(store.root.parent / "m", img1.lowerdirs) as m:
        assert sorted(os.listdir(m)) == ["etc", "one"]

    removed = store.remove("img1")
    assert removed == ["Untagged: img1:latest", f"Deleted: {id1}", f"Deleted: {img1.layers[1].chain_id}"]
    assert _contents(store) == (2, 3, 1)
    assert (img2.layers[0].diff / "shared").read_bytes() == b"s" * 5000
    store.remove("img2:v2")
    assert _contents(store) == (0, 0, 0)


def test_rmi_by_id_with_several_tags_needs_force(store: Store) -> None:
    image_id = store.add_image(_config(BASE), [_source(BASE)], ["a", "b"])
    with pytest.raises(StrataError, match="2 tags"):
        store.remove(image_id)
    store.remove("a")
    assert store.image(image_id).tags == ["b:latest"]
    store.tag("b", "c:1")
    assert store.remove(image_id, force=True)[:2] == ["Untagged: b:latest", "Untagged: c:1"]
    assert _contents(store) == (0, 0, 0)


@pytest.mark.parametrize(
    "layers, message",
    [
        ([_source(BASE), _source(TOP2)], "digest mismatch"),  # TOP2 where the config says TOP1
        ([_source(BASE), _source(TOP1, "sha256:" + "e" * 64)], "digest mismatch"),
        ([_source(BASE)], "lists 2 layers"),
        ([_source(BASE), _source(TarBuilder().file("../x").bytes())], r"'\.\.'"),
    ],
)
def test_bad_images_change_nothing(store: Store, layers: list[LayerSource], message: str) -> None:
    store.add_image(_config(BASE), [_source(BASE)], ["keep"])
    before = snapshot(store.root)
    with pytest.raises(StrataError, match=message):
        store.add_image(_config(BASE, TOP1), layers, ["bad"])
    after = snapshot(store.root)
    for d in (before, after):  # the lock file's and the scratch dir's times change, nothing else may
        d.pop("store.lock", None)
        d.pop("tmp", None)
    assert after == before


def test_commit_of_an_upper_reapplies_to_the_merged_view(store: Store, tmp_path: Path) -> None:
    base_id = store.add_image(_config(BASE), [_source(BASE)], ["base"])
    lowers = [x.diff for x in store.image(base_id).layers]
    with overlay(tmp_path / "m", lowers, tmp_path / "u", tmp_path / "w") as m:
        (m / "etc" / "os-release").write_text("ID=changed\n")
        os.unlink(m / "shared")
        (m / "new").mkdir()
        (m / "new" / "f").write_bytes(b"f")
        reference = snapshot(m)
    new_id = store.commit(base_id, tmp_path / "u", created_by="test commit", tag="committed", comment="c")
    img = store.image(new_id)
    assert len(img.layers) == 2 and img.layers[0].chain_id == store.image(base_id).layers[0].chain_id
    assert img.config["history"][-1]["created_by"] == "test commit"
    with overlay(tmp_path / "m2", img.lowerdirs) as m:
        assert snapshot(m) == reference


# --- the CLI ---------------------------------------------------------------------------


def test_cli_import_images_tag_inspect_history_rmi(
    strata: Callable[..., Any], tmp_path: Path, store: Store
) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hi\n")
    tgz = tmp_path / "rootfs.tar.gz"
    tgz.write_bytes(gzip.compress(TarBuilder().dir("bin").file("bin/hello", b"#!/bin/sh\necho hi\n").bytes()))

    dir_id = strata("image", "import", str(rootfs), "fromdir:1").out.strip()
    tar_id = strata("import", str(tgz), "fromtar").out.strip()
    assert dir_id.startswith("sha256:") and tar_id.startswith("sha256:")

    table = strata("images").out.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    rows = [r.split()[:3] for r in table[1:]]
    assert rows == [["fromdir", "1", dir_id[7:19]], ["fromtar", "latest", tar_id[7:19]]]

    strata("tag", "fromtar", "127.0.0.1:5000/some/name:v1")
    listed = json.loads(strata("images", "--format", "json").out)
    assert {(r["Repository"], r["Tag"]) for r in listed} == {
        ("fromdir", "1"), ("fromtar", "latest"), ("127.0.0.1:5000/some/name", "v1")}

    info = json.loads(strata("image", "inspect", "fromtar").out)
    assert info[0]["Id"] == tar_id and info[0]["RootFS"]["Layers"][0].startswith("sha256:")
    lower = info[0]["GraphDriver"]["Data"]["LowerDir"]
    assert (Path(lower) / "bin" / "hello").read_bytes() == b"#!/bin/sh\necho hi\n"

    hist = json.loads(strata("history", "--format", "json", "fromdir:1").out)
    assert hist[0]["ID"] == dir_id and hist[0]["CreatedBy"] == "strata image import rootfs"
    assert "strata image import" in strata("history", "fromdir:1").out

    bad = strata("rmi", tar_id, check=False)
    assert bad.code == 1 and "2 tags" in bad.err
    bad = strata("image", "import", str(tmp_path / "missing.tar"), "x", check=False)
    assert bad.code == 1 and "no such file" in bad.err
    bad = strata("tag", "fromtar", "UPPER:case", check=False)
    assert bad.code == 1 and "invalid reference" in bad.err
    bad = strata("save", "-o", str(tmp_path / "missing" / "x.tar"), "fromtar", check=False)
    assert bad.code == 1 and bad.err == f"strata: {tmp_path / 'missing'}: no such directory\n"
    bad = strata("history", "nosuchimage", check=False)
    assert bad.code == 1 and bad.err == "strata: no such image: nosuchimage\n"

    out = strata("rmi", "-f", tar_id, "fromdir:1").out
    assert "Untagged: fromtar:latest" in out and f"Deleted: {dir_id}" in out
    assert strata("images", "-q").out == ""
    assert _contents(store) == (0, 0, 0)


def test_held_image_survives_rmi_until_released(store: Store) -> None:
    image_id = store.add_image(_config(BASE), [_source(BASE)], ["busy"])
    assert store.hold("container-1", "busy") == image_id
    with pytest.raises(StrataError, match="in use by container-1"):
        store.remove("busy")
    assert store.remove("busy", force=True) == ["Untagged: busy:latest"]
    assert store.image(image_id).tags == [] and _contents(store) == (1, 2, 1)
    with pytest.raises(StrataError, match="invalid holder"):
        store.hold("../escape", image_id)
    store.release("container-1")
    assert _contents(store) == (0, 0, 0)
    store.release("container-1")  # twice is fine


def test_crash_leftovers_are_swept_by_the_next_writer(store: Store) -> None:
    """A writer killed mid-import leaves only a staging dir, which the next writer removes;
    a download dir of a pull still running (not under the lock) is left alone."""
    (store.tmp_dir / "stage-killed" / "layer" / "diff").mkdir(parents=True)
    (store.tmp_dir / "deleting-abc").mkdir()
    (store.tmp_dir / "download-running").mkdir()
    store.add_image(_config(BASE), [_source(BASE)], ["after-crash"])
    assert sorted(p.name for p in store.tmp_dir.iterdir()) == ["download-running"]
    assert store.image(store.resolve("after-crash")).layers[0].diff.is_dir()


def test_concurrent_imports_of_one_layer_store_it_once(store: Store, tmp_path: Path) -> None:
    import subprocess
    import sys

    tar = tmp_path / "rootfs.tar"
    tar.write_bytes(TarBuilder().dir("big").file("big/blob", os.urandom(4 << 20)).bytes())
    strata_bin = str(Path(sys.executable).with_name("strata"))
    procs = [
        subprocess.Popen([strata_bin, "--root", str(store.root), "import", str(tar), f"same:{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert len(os.listdir(store.layers_dir)) == 1
    assert {t for img in store.images() for t in img.tags} == {"same:0", "same:1", "same:2"}
    assert [p.name for p in store.tmp_dir.iterdir()] == []
