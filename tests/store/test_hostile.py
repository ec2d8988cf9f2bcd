"""The store against issue 11's attacks: host users reaching into the state root, trees
deeper than Python's stack, sizes that lie, JSON nested 30,000 deep, a layer produced from
a tree renamed under it, archives pointing out of themselves. Each is refused with one
line or works, leaves nothing behind, and the next ordinary command works."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from common.errors import StrataError
from common.parsing import MAX_JSON_DEPTH
from common.tree import remove_path
from images import formats
from images import registry as client
from images.archive import apply_layer
from images.digest import sha256_bytes
from images.produce import produce_layer
from images.store import LayerSource, Store
from tests.store.helpers import TarBuilder, as_nobody, deep_tar, depth_of, make_deep, reachable_dir

DEEP_JSON = b"[" * 30_000 + b"]" * 30_000


def _config(*tars: bytes) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                       "rootfs": {"type": "layers", "diff_ids": [sha256_bytes(t) for t in tars]}}).encode()


def _source(data: bytes) -> LayerSource:
    return LayerSource(lambda: io.BytesIO(data), None, len(data))  # type: ignore[arg-type,return-value]


def _empty(store: Store) -> bool:
    """Nothing of any image, layer, blob or staging left."""
    dirs = (store.layers_dir, store.blobs_dir, store.images_dir, store.tmp_dir)
    return not any(os.listdir(d) for d in dirs)


def _one_line(err: str) -> bool:
    return err.startswith("strata: ") and err.count("\n") == 1 and "Traceback" not in err and len(err) < 400


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """pytest deletes old tmp dirs with the recursive shutil.rmtree: the deep trees made
    here go at the end of each test."""
    yield tmp_path
    for entry in tmp_path.iterdir():
        remove_path(entry)


# --- host users ------------------------------------------------------------------------


@pytest.fixture
def reachable() -> Iterator[Path]:
    with reachable_dir() as top:
        yield top


def test_host_users_cannot_reach_the_state_whatever_the_umask(reachable: Path) -> None:
    """Issue 11: a host user ran a setuid-root file straight from layers/sha256/*/diff."""
    suid = Path("/usr/bin/id").read_bytes()
    layer = TarBuilder().dir("bin").file("bin/id", suid, mode=0o4755, uid=0, gid=0)
    layer.file("secret", b"only root", mode=0o644)
    old = os.umask(0)
    try:
        store = Store(reachable / "state")
        image_id = store.add_image(_config(data := layer.bytes()), [_source(data)], ["suid"])
    finally:
        os.umask(old)
    diff = store.image(image_id).layers[0].diff
    assert stat.S_IMODE(os.stat(diff / "bin" / "id").st_mode) == 0o4755
    modes = {p: stat.S_IMODE(os.stat(store.root / p).st_mode)
             for p in ("", "layers", "layers/sha256", "blobs", "blobs/sha256", "images", "images/sha256",
                       "tmp", "holds")}
    assert modes == {"": 0o710} | {p: 0o700 for p in modes if p}

    # The control: the same file where host users can reach it makes them root.
    control = reachable / "id"
    shutil.copy(diff / "bin" / "id", control)
    os.chmod(control, 0o4755)
    assert as_nobody(str(control), "-u").stdout.strip() == "0"
    os.unlink(control)

    ran = as_nobody(str(diff / "bin" / "id"), "-u")
    assert ran.returncode != 0 and "Permission denied" in ran.stderr
    for argv in (["cat", str(diff / "secret")], ["ls", str(store.root)], ["ls", str(store.layers_dir)]):
        assert as_nobody(*argv).returncode != 0, argv


def test_a_loose_existing_state_root_is_tightened(reachable: Path) -> None:
    root = reachable / "state"
    for d in ("layers/sha256", "blobs/sha256", "images", "tmp"):
        (root / d).mkdir(parents=True)
    for d in (root, root / "layers", root / "layers/sha256", root / "tmp"):
        os.chmod(d, 0o2777)
    os.chown(root / "layers", 65534, 65534)
    store = Store(root)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o710
    for d in (store.layers_dir.parent, store.layers_dir, store.tmp_dir):
        st = os.stat(d)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0), d
    (root / "holds").rmdir()
    (root / "holds").symlink_to(reachable)
    with pytest.raises(StrataError, match="holds: .*real directory"):
        Store(root)


# --- deep trees ------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_100, 5_000])
def test_a_deep_tar_with_a_bad_entry_is_refused_and_the_store_keeps_working(
    strata: Callable[..., Any], store: Store, tmp_path: Path, depth: int
) -> None:
    """Issue 11: a 1,100-level tar with one bad entry gave a traceback, and every later
    import, rmi and run failed. 5,000 levels outgrow PATH_MAX: refused as well, in one line."""
    bad = tmp_path / "bad.tar"
    bad.write_bytes(deep_tar(depth, ("../escape", b"x")))
    res = strata("image", "import", str(bad), "bad", check=False)
    assert res.code == 1 and _one_line(res.err), res.err
    assert ("'..'" if depth < 2000 else "File name too long") in res.err
    assert _empty(store) and not (tmp_path / "escape").exists()

    ok = tmp_path / "ok.tar"
    ok.write_bytes(TarBuilder().file("hello", b"hi").bytes())
    strata("image", "import", str(ok), "ok")
    strata("rmi", "ok")
    assert _empty(store)


def test_a_deep_layer_imports_and_every_later_command_works(
    strata: Callable[..., Any], store: Store, fresh: Store, tmp_path: Path
) -> None:
    tar = tmp_path / "deep.tar"
    tar.write_bytes(deep_tar(1_500))
    image_id = strata("image", "import", str(tar), "deep").out.strip()
    assert depth_of(store.image(image_id).layers[0].diff) == 1_500
    assert json.loads(strata("system", "df", "--format", "json").out)["layers"] == 1
    strata("system", "dedup")
    strata("save", "-o", str(tmp_path / "deep-save.tar"), "deep")
    assert formats.load(fresh, tmp_path / "deep-save.tar") == [(image_id, ["deep:latest"])]
    # An image made of its directory: the walk of a tree deeper than the stack.
    tree = tmp_path / "tree"
    tree.mkdir()
    make_deep(tree, 1_500, b"deep")
    strata("image", "import", str(tree), "fromdir")
    assert strata("rmi", "deep", "fromdir").code == 0
    assert _empty(store)


def test_leftovers_of_any_depth_are_swept_by_the_next_writer(store: Store) -> None:
    for name in ("stage-killed", "deleting-abc"):
        (store.tmp_dir / name).mkdir()
        make_deep(store.tmp_dir / name, 5_000, b"x")
    store.add_image(_config(t := TarBuilder().file("a").bytes()), [_source(t)], ["after"])
    assert os.listdir(store.tmp_dir) == []


def test_produce_layer_of_an_upper_deeper_than_the_stack(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    make_deep(upper, 1_500, b"bottom")
    out = io.BytesIO()
    produce_layer(upper, out)
    apply_layer(io.BytesIO(out.getvalue()), tmp_path / "layer")
    assert depth_of(tmp_path / "layer") == 1_500

    # 5,000 levels: the tar is written (names of 10,000 characters); a layer that deep
    # cannot be extracted on the host (PATH_MAX) and is refused in one line.
    (tmp_path / "deeper").mkdir()
    make_deep(tmp_path / "deeper", 5_000, b"bottom")
    out = io.BytesIO()
    produce_layer(tmp_path / "deeper", out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert len(tar.getmembers()) == 5_001
    with pytest.raises(StrataError, match="File name too long") as refused:
        apply_layer(io.BytesIO(out.getvalue()), tmp_path / "layer2")
    assert len(str(refused.value)) < 300 and not (tmp_path / "layer2").exists()


# --- produce_layer anchored ------------------------------------------------------------


def test_produce_layer_never_follows_a_symlink_swapped_in_meanwhile(tmp_path: Path) -> None:
    """Issue 11: 8 of 8 commits of a container renaming files ended in a traceback, and the
    lstat-then-open walk could follow a symlink swapped in between. Now each run writes a
    layer or fails in one line, and no byte from outside the upper ever gets in."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"SECRET")
    (outside / "sub").mkdir()
    upper = tmp_path / "upper"
    (upper / "a" / "sub").mkdir(parents=True)
    (upper / "a" / "f").write_bytes(b"mine")
    for i in range(50):
        (upper / "a" / "sub" / f"n{i}").write_bytes(b"n")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.rename(upper / "a", upper / "b")
                os.symlink(outside, upper / "a")
                os.unlink(upper / "a")
                (upper / "a").symlink_to(outside / "f")
                os.unlink(upper / "a")
                os.rename(upper / "b", upper / "a")

    thread = threading.Thread(target=churn)
    thread.start()
    written = refused = 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (written < 20 or refused < 5):
            out = io.BytesIO()
            try:
                produce_layer(upper, out)
            except StrataError as e:
                assert "\n" not in str(e) and str(e).startswith(f"cannot make a layer of {upper}")
                refused += 1
                continue
            written += 1
            with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
                for m in tar:
                    f = tar.extractfile(m) if m.isreg() else None
                    assert f is None or f.read() != b"SECRET", m.name
                    assert not m.name.startswith("a/") or not m.issym(), m.name
    finally:
        stop.set()
        thread.join()
    assert written and refused, (written, refused)


# --- sizes ------------------------------------------------------------------------------


def _sparse_tar(tmp_path: Path, size: str) -> Path:
    """A tar of a few KiB (GNU sparse) declaring a file of `size`."""
    sparse = tmp_path / "sparse"
    subprocess.run(["truncate", "-s", size, str(sparse)], check=True)
    tar = tmp_path / f"sparse-{size}.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(tmp_path), "sparse"],
                   check=True)
    sparse.unlink()
    assert tar.stat().st_size <= 20 << 10
    return tar


def test_a_layer_declaring_more_than_the_limit_is_refused_before_extraction(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strata: Callable[..., Any]
) -> None:
    """Issue 11: a 10 KiB sparse tar declaring a 10 GiB file was accepted."""
    monkeypatch.setenv("STRATA_MAX_LAYER_SIZE", "1g")
    started = time.monotonic()
    res = strata("image", "import", str(_sparse_tar(tmp_path, "10G")), "sparse", check=False)
    assert res.code == 1 and _one_line(res.err) and "declare more than 1073741824 bytes" in res.err
    assert time.monotonic() - started < 5 and _empty(store)
    # Without a configured limit, the free space of the store's filesystem is the limit.
    monkeypatch.delenv("STRATA_MAX_LAYER_SIZE")
    free = os.statvfs(store.tmp_dir)
    huge = free.f_bavail * free.f_frsize + (1 << 30)
    res = strata("image", "import", str(_sparse_tar(tmp_path, str(huge))), "huge", check=False)
    assert res.code == 1 and "declare more than" in res.err and _empty(store)
    ok = tmp_path / "ok.tar"
    ok.write_bytes(TarBuilder().file("a", b"a").bytes())
    strata("image", "import", str(ok), "ok")


# --- JSON and archives -------------------------------------------------------------------


def _archive(tmp_path: Path, files: dict[str, bytes], name: str = "a.tar") -> Path:
    b = TarBuilder()
    for n, data in files.items():
        b.file(n, data)
    path = tmp_path / name
    path.write_bytes(b.bytes())
    return path


def test_json_nested_30000_deep_is_refused_in_one_line(
    store: Store, strata: Callable[..., Any], tmp_path: Path
) -> None:
    layer = TarBuilder().file("a").bytes()
    config = _config(layer)
    cname = f"{sha256_bytes(config)[7:]}.json"
    cases = {
        "manifest.json": {"manifest.json": DEEP_JSON},
        "index.json": {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": DEEP_JSON},
        "image config": {
            "l/layer.tar": layer,
            f"{sha256_bytes(DEEP_JSON)[7:]}.json": DEEP_JSON,
            "manifest.json": json.dumps([{"Config": f"{sha256_bytes(DEEP_JSON)[7:]}.json",
                                          "Layers": ["l/layer.tar"]}]).encode(),
        },
    }
    for what, files in cases.items():
        res = strata("load", "-i", str(_archive(tmp_path, files)), check=False)
        assert res.code == 1 and _one_line(res.err), res.err
        assert f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels" in res.err
        assert _empty(store)
    good = _archive(tmp_path, {"l/layer.tar": layer, cname: config, "manifest.json": json.dumps(
        [{"Config": cname, "RepoTags": ["good:1"], "Layers": ["l/layer.tar"]}]).encode()})
    assert strata("load", "-i", str(good)).out == "Loaded image: good:1\n"


def test_a_refused_multi_layer_load_leaves_no_orphan(store: Store, strata: Callable[..., Any],
                                                      tmp_path: Path) -> None:
    """Issue 11: the layers stored before the bad one stayed, in no image."""
    good, bad = TarBuilder().file("a").bytes(), TarBuilder().file("../b").bytes()
    config = _config(good, bad)
    cname = f"{sha256_bytes(config)[7:]}.json"
    entry = {"Config": cname, "RepoTags": ["two:1"], "Layers": ["1/layer.tar", "2/layer.tar"]}
    archive = _archive(tmp_path, {"1/layer.tar": good, "2/layer.tar": bad, cname: config,
                                  "manifest.json": json.dumps([entry]).encode()})
    res = strata("load", "-i", str(archive), check=False)
    assert res.code == 1 and "'..'" in res.err and _empty(store)


def _layout_dir(tmp_path: Path) -> tuple[Path, bytes]:
    """A docker save archive as a directory; returns it and its layer."""
    layer = TarBuilder().file("a", b"layer").bytes()
    config = _config(layer)
    cname = f"{sha256_bytes(config)[7:]}.json"
    d = tmp_path / "dir-archive"
    (d / "l").mkdir(parents=True)
    (d / cname).write_bytes(config)
    (d / "manifest.json").write_text(json.dumps([{"Config": cname, "RepoTags": ["dir:1"],
                                                  "Layers": ["l/layer.tar"]}]))
    return d, layer


def test_a_directory_archive_reads_only_regular_files_inside_it(store: Store, tmp_path: Path) -> None:
    """Issue 11: a symlinked layer.tar was followed out of the archive; a FIFO hung the load."""
    d, layer = _layout_dir(tmp_path)
    outside = tmp_path / "outside.tar"
    outside.write_bytes(layer)
    (d / "l" / "layer.tar").symlink_to(outside)
    with pytest.raises(StrataError, match="l/layer.tar is a symlink; refused"):
        formats.load(store, d)
    (d / "l" / "layer.tar").unlink()
    os.mkfifo(d / "l" / "layer.tar")
    with pytest.raises(StrataError, match="is not a regular file; refused"):
        formats.load(store, d)
    (d / "l" / "layer.tar").unlink()
    (d / "l").rename(d / "real")
    (d / "l").symlink_to(d / "real")  # a directory on the way: refused as well
    (d / "real" / "layer.tar").write_bytes(layer)
    with pytest.raises(StrataError, match="goes through a symlink"):
        formats.load(store, d)
    assert _empty(store)
    (d / "l").unlink()
    (d / "real").rename(d / "l")
    assert formats.load(store, d)[0][1] == ["dir:1"]


def test_a_tar_archive_with_a_chain_of_links_is_refused(store: Store, tmp_path: Path) -> None:
    """tarfile follows links in an archive by recursion: a 30,000-link chain is refused after a few."""
    b = TarBuilder().file("l0", b"x")
    for i in range(1, 30_000):
        b.symlink(f"l{i}", f"l{i - 1}")
    config = _config(b"x")
    b.file("manifest.json", json.dumps([{"Config": "l29999", "Layers": ["l29999"]}]).encode())
    (tmp_path / "links.tar").write_bytes(b.bytes())
    with pytest.raises(StrataError, match="more than 8 links"):
        formats.load(store, tmp_path / "links.tar")
    assert config and _empty(store)


# --- a hostile registry ------------------------------------------------------------------


@contextlib.contextmanager
def _fake_registry(routes: dict[str, Callable[[web.Request], web.StreamResponse]]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering GETs (path → handler); yields host:port."""

    async def dispatch(request: web.Request) -> web.StreamResponse:
        return routes[request.path](request) if request.path in routes else web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        yield f"{host}:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_a_hostile_registry_gets_one_line_errors_and_fills_nothing(store: Store) -> None:
    layer = TarBuilder().file("a", b"layer").bytes()
    config = _config(layer)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": formats.OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_bytes(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256_bytes(layer),
                    "size": 100}],  # smaller than what is sent
    }).encode()

    def deep(request: web.Request) -> web.Response:
        return web.Response(body=DEEP_JSON, content_type="application/json")

    def deep_error(request: web.Request) -> web.Response:
        return web.Response(status=404, body=DEEP_JSON, content_type="application/json")

    def good_manifest(request: web.Request) -> web.Response:
        return web.Response(body=manifest, content_type=formats.OCI_MANIFEST)

    def config_blob(request: web.Request) -> web.Response:
        return web.Response(body=config)

    def endless(request: web.Request) -> web.Response:
        return web.Response(body=layer + b"\0" * (1 << 20))

    routes = {
        "/v2/deep/manifests/v1": deep, "/v2/error/manifests/v1": deep_error,
        "/v2/big/manifests/v1": good_manifest,
        f"/v2/big/blobs/{sha256_bytes(config)}": config_blob, f"/v2/big/blobs/{sha256_bytes(layer)}": endless,
    }
    with _fake_registry(routes) as host:
        for name, message in (("deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"),
                              ("error", "registry answered 404 Not Found"),
                              ("big", "the registry sent more than its 100 bytes")):
            with pytest.raises(StrataError) as refused:
                client.pull(store, f"{host}/{name}:v1", insecure=True)
            assert message in str(refused.value) and "\n" not in str(refused.value)
            assert _empty(store)
