"""Image formats against real tools: OCI layouts and docker archives through skopeo,
pull and push against Debian's docker-registry, digests that do not match."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import StrataError
from images import formats
from images import registry as client
from images.digest import sha256_bytes
from images.store import LayerSource, Store
from tests.store.helpers import TarBuilder, image_view
from tests.store.registry import Registry, running_registry

SKOPEO = "/usr/bin/skopeo"


def skopeo(*args: str) -> str:
    if not os.path.exists(SKOPEO):
        pytest.fail("skopeo missing: install Debian's skopeo (make deps)")
    proc = subprocess.run([SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"skopeo {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_oci_layout_both_ways_through_skopeo(
    store: Store, sample: str, fresh: Store, strata: Callable[..., Any], tmp_path: Path
) -> None:
    a, b, z = tmp_path / "a", tmp_path / "b", tmp_path / "z"
    strata("save", "--format", "oci-dir", "-o", str(a), "sample:v1")
    raw = json.loads(skopeo("inspect", "--raw", f"oci:{a}:v1"))
    assert raw["config"]["digest"] == sample and len(raw["layers"]) == 3
    skopeo("copy", f"oci:{a}:v1", f"oci:{b}:v1")
    # skopeo recompresses every layer as zstd: strata must read those too.
    skopeo("copy", "--dest-compress-format", "zstd", "--dest-compress", f"oci:{a}:v1", f"oci:{z}:v1")
    zman = json.loads(skopeo("inspect", "--raw", f"oci:{z}:v1"))
    assert all(x["mediaType"].endswith("+zstd") for x in zman["layers"])

    reference = image_view(store, sample, tmp_path / "m0")
    [(got, tags)] = formats.load(fresh, b)
    assert got == sample and tags == []  # skopeo keeps only the tag, not the name
    assert image_view(fresh, got, tmp_path / "m1") == reference
    fresh.remove(got)
    [(got, _)] = formats.load(fresh, z)
    assert got == sample and fresh.image(got).layers[0].media_type.endswith("+zstd")
    assert image_view(fresh, got, tmp_path / "m2") == reference


def test_docker_archives_through_skopeo(
    store: Store, sample: str, fresh: Store, strata: Callable[..., Any], tmp_path: Path
) -> None:
    classic, oci_tar = tmp_path / "classic.tar", tmp_path / "oci.tar"
    strata("save", "-o", str(classic), "sample:v1")
    strata("save", "--format", "oci", "-o", str(oci_tar), "sample:v1")
    with tarfile.open(classic) as tar:
        names = tar.getnames()
    assert "manifest.json" in names and f"{sample[7:]}.json" in names
    assert sum(n.endswith("/layer.tar") for n in names) == 3

    # skopeo reads both archives strata wrote (converting to OCI rewrites the config, not the layers) ...
    diff_ids = store.image(sample).config["rootfs"]["diff_ids"]
    for src in (f"docker-archive:{classic}", f"oci-archive:{oci_tar}:v1"):
        out = tmp_path / f"copy-{src.split(':')[0]}"
        skopeo("copy", src, f"oci:{out}:v1")
        assert json.loads(skopeo("inspect", "--config", f"oci:{out}:v1"))["rootfs"]["diff_ids"] == diff_ids
    # ... and strata reads the docker archive skopeo writes.
    theirs = tmp_path / "theirs.tar"
    skopeo("copy", f"docker-archive:{classic}", f"docker-archive:{theirs}:elsewhere/sample:v2")
    [(got, tags)] = formats.load(fresh, theirs)
    assert got == sample and tags == ["elsewhere/sample:v2"]
    assert image_view(fresh, got, tmp_path / "m1") == image_view(store, sample, tmp_path / "m0")

    # Our own archives load back (the OCI form keeps the full name).
    fresh.remove(got)
    assert formats.load(fresh, oci_tar) == [(sample, ["sample:v1"])]
    fresh.remove(sample)
    assert strata("load", "-i", str(classic)).out == "Loaded image: sample:v1\n"
    gz = tmp_path / "classic.tar.gz"  # `docker save IMAGE | gzip`
    gz.write_bytes(gzip.compress(classic.read_bytes()))
    assert formats.load(fresh, gz) == [(sample, ["sample:v1"])]


def _tamper_archive(src: Path, dest: Path, member_suffix: str, offset: int) -> None:
    """Copy a tar archive, flipping one byte of the first matching member at offset."""
    done = False
    with tarfile.open(src) as tin, tarfile.open(dest, "w") as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m)
            data = f.read() if f else b""
            if not done and m.name.endswith(member_suffix) and data:
                tar_data = bytearray(data)
                tar_data[offset] ^= 0xFF
                data, done = bytes(tar_data), True
            tout.addfile(m, io.BytesIO(data) if f else None)
    assert done


def test_tampered_archive_refused_store_unchanged(
    store: Store, sample: str, fresh: Store, strata: Callable[..., Any], tmp_path: Path
) -> None:
    classic, bad = tmp_path / "classic.tar", tmp_path / "bad.tar"
    strata("save", "-o", str(classic), "sample:v1")
    _tamper_archive(classic, bad, "layer.tar", 600)  # in the first file's content, past its header
    with pytest.raises(StrataError, match="digest mismatch"):
        formats.load(fresh, bad)
    assert fresh.images() == [] and os.listdir(fresh.layers_dir) == [] and os.listdir(fresh.blobs_dir) == []

    _tamper_archive(classic, bad, f"{sample[7:]}.json", 20)
    with pytest.raises(StrataError, match="digest mismatch"):
        formats.load(fresh, bad)
    res = strata("load", "-i", str(tmp_path / "nope.tar"), check=False)
    assert res.code == 1 and "no such file" in res.err


# --- registry --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with running_registry() as r:
        yield r


def test_push_then_skopeo_pulls_and_strata_pulls_what_skopeo_pushed(
    store: Store, sample: str, fresh: Store, strata: Callable[..., Any], registry: Registry, tmp_path: Path
) -> None:
    name = f"{registry.host}/strata/sample:v1"
    strata("tag", "sample:v1", name)
    out = strata("push", "--insecure", name).out
    digest = out.strip().rsplit(" ", 1)[1]
    assert digest.startswith("sha256:")
    # A second push uploads nothing new and gives the same manifest digest.
    assert client.push(store, name, insecure=True) == digest

    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{name}"))
    assert inspected["Digest"] == digest and len(inspected["Layers"]) == 3
    pulled_dir = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", f"docker://{name}", f"oci:{pulled_dir}:v1")
    assert json.loads(skopeo("inspect", "--raw", f"oci:{pulled_dir}:v1"))["config"]["digest"] == sample

    # skopeo pushes (as docker schema 2, recompressed) under another name; strata pulls it.
    other = f"{registry.host}/from-skopeo/img:v2"
    skopeo("copy", "--dest-tls-verify=false", "--format", "v2s2", f"oci:{pulled_dir}:v1", f"docker://{other}")
    pulled = client.pull(fresh, other, insecure=True)
    assert pulled == sample and fresh.image(pulled).tags == [other]
    assert image_view(fresh, pulled, tmp_path / "m1") == image_view(store, sample, tmp_path / "m0")
    assert client.pull(fresh, f"{registry.host}/strata/sample@{digest}", insecure=True) == sample

    res = strata("pull", "--insecure", f"{registry.host}/missing/image:v1", check=False)
    assert res.code == 1 and "MANIFEST_UNKNOWN" in res.err
    res = strata("pull", name, check=False)
    assert res.code == 1 and "use --insecure" in res.err


def test_pull_refuses_a_blob_the_registry_corrupted(
    store: Store, sample: str, fresh: Store, registry: Registry
) -> None:
    name = f"{registry.host}/strata/corrupt:v1"
    store.tag("sample:v1", name)
    client.push(store, name, insecure=True)
    top = store.image(sample).layers[-1].blob_digest[7:]
    data = registry.storage / "docker/registry/v2/blobs/sha256" / top[:2] / top / "data"
    good = data.read_bytes()
    blob = bytearray(good)
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    try:
        with pytest.raises(StrataError, match="digest mismatch"):
            client.pull(fresh, name, insecure=True)
    finally:
        data.write_bytes(good)  # the registry's blob store is shared by the module's tests
    assert fresh.images() == [] and os.listdir(fresh.layers_dir) == []
    assert [p.name for p in fresh.tmp_dir.iterdir()] == []


def _multi_arch_layout(store: Store, sample: str, dest: Path) -> str:
    """An OCI layout whose only entry is an image index: an arm64 variant and this host's."""
    config = store.image(sample).config
    arm = dict(config, architecture="arm64")
    layers = store.image(sample).layers
    sources = [LayerSource.from_file(store.blob_path(x.blob_digest), x.blob_digest) for x in layers]
    arm_id = store.add_image(json.dumps(arm).encode(), sources, ["sample:arm64"])
    formats.save_oci_layout(store, ["sample:arm64", "sample:v1"], dest)
    index = json.loads((dest / "index.json").read_text())
    manifests = []
    for desc, arch in zip(index["manifests"], ["arm64", "amd64"], strict=True):
        manifests.append({k: desc[k] for k in ("mediaType", "digest", "size")}
                         | {"platform": {"os": "linux", "architecture": arch}})
    doc = {"schemaVersion": 2, "mediaType": formats.OCI_INDEX, "manifests": manifests}
    nested = json.dumps(doc).encode()
    (dest / "blobs" / "sha256" / sha256_bytes(nested)[7:]).write_bytes(nested)
    index["manifests"] = [{"mediaType": formats.OCI_INDEX, "digest": sha256_bytes(nested),
                           "size": len(nested), "annotations": {formats.REF_NAME: "multi"}}]
    (dest / "index.json").write_text(json.dumps(index))
    return arm_id


def test_image_indexes_pick_this_platform(
    store: Store, sample: str, fresh: Store, registry: Registry, tmp_path: Path
) -> None:
    layout = tmp_path / "multi"
    arm_id = _multi_arch_layout(store, sample, layout)
    assert arm_id != sample
    assert formats.load(fresh, layout) == [(sample, [])]
    name = f"{registry.host}/multi/arch:v1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:multi", f"docker://{name}")
    fresh.remove(sample)
    assert client.pull(fresh, name, insecure=True) == sample


def test_cli_load_from_stdin_and_save_to_stdout(store: Store, sample: str, tmp_path: Path) -> None:
    strata_bin = str(Path(sys.executable).with_name("strata"))
    archive = tmp_path / "out.tar"
    with open(archive, "wb") as f:
        subprocess.run([strata_bin, "--root", str(store.root), "save", "sample:v1"], stdout=f, check=True)
    other = tmp_path / "other-root"
    with open(archive, "rb") as f:
        proc = subprocess.run([strata_bin, "--root", str(other), "load"], stdin=f, capture_output=True,
                              text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Loaded image: sample:v1\n"
    assert Store(other).resolve("sample:v1") == sample
    proc = subprocess.run([strata_bin, "--root", str(other), "load", "-i", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("strata: ") and proc.stderr.count("\n") == 1


def test_docker_archive_with_a_layer_tar_symlinked(fresh: Store, tmp_path: Path) -> None:
    """docker save writes a layer it already wrote as a symlink to the first copy."""
    layer = TarBuilder().file("same", b"same content").bytes()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_bytes(layer)] * 2}}).encode()
    archive = TarBuilder().dir("aaa").file("aaa/layer.tar", layer).dir("bbb")
    archive.symlink("bbb/layer.tar", "../aaa/layer.tar").file(f"{sha256_bytes(config)[7:]}.json", config)
    manifest = [{"Config": f"{sha256_bytes(config)[7:]}.json", "RepoTags": ["twice:1"],
                 "Layers": ["aaa/layer.tar", "bbb/layer.tar"]}]
    (tmp_path / "a.tar").write_bytes(archive.file("manifest.json", json.dumps(manifest).encode()).bytes())
    [(image_id, _)] = formats.load(fresh, tmp_path / "a.tar")
    layers = fresh.image(image_id).layers
    assert len(layers) == 2 and layers[0].chain_id != layers[1].chain_id
    assert (layers[1].diff / "same").read_bytes() == b"same content"
