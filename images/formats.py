"""Image archives on disk, in and out of the store: `docker save` archives (the classic
`<id>/layer.tar` form docker 20.10 writes and the OCI-layout form of docker 25+) and
OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/...`, as skopeo's `oci:`).

Every blob read is checked against the digest that names it (config file names,
manifest descriptors, the config's DiffIDs); a mismatch refuses the whole load.

Load and save of both forms share one reader of archives and directories (tar
member or anchored file, the same digest checks), which is why they are one
module of ~450 lines."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from common.atomic import atomic_file
from common.dirwalk import O_DIR
from common.errors import StrataError
from common.parsing import load_json
from common.tree import remove_path
from images import reference
from images.digest import check_digest, sha256_bytes, verify_bytes
from images.store import OCI_CONFIG, OCI_MANIFEST, Image, Layer, LayerSource, Store, host_architecture

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

Progress = Callable[[int], None]


# --- manifests -------------------------------------------------------------------------


def oci_manifest(store: Store, img: Image) -> bytes:
    """The image's OCI manifest (deterministic, so its digest is stable across pushes)."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": img.id, "size": len(store.read_blob(img.id))},
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.blob_digest, "size": layer.blob_size}
            for layer in img.layers
        ],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from outside (depth-checked by load_json), or a one-line error."""
    doc = load_json(data, what)
    if not isinstance(doc, dict):
        raise StrataError(f"{what} is not a JSON object")
    return doc


def pick_platform(index: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an index (or docker manifest list) that runs here."""
    arch = host_architecture()
    descs = index.get("manifests")
    for desc in descs if isinstance(descs, list) else []:
        plat = (desc.get("platform") or {}) if isinstance(desc, dict) else None
        if not isinstance(plat, dict):
            continue
        if plat.get("os", "linux") == "linux" and plat.get("architecture", arch) == arch:
            return dict(desc)
    raise StrataError(f"no linux/{arch} image in the index")


def parse_manifest(data: bytes) -> dict[str, Any]:
    """A schema 2 / OCI image manifest, its config and layer descriptors checked for form
    (a digest and a size each: what a download may be held to)."""
    manifest = json_object(data, "image manifest")
    try:
        for desc in [manifest["config"], *manifest["layers"]]:
            check_digest(desc["digest"])
            if not isinstance(desc["size"], int) or desc["size"] < 0:
                raise TypeError
    except (KeyError, TypeError):
        raise StrataError("not an image manifest (schema 2 / OCI: digests and sizes)") from None
    return manifest


# --- reading archives and layouts ------------------------------------------------------


def _safe_name(name: str) -> str:
    """A file named inside an archive must stay inside it."""
    if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/"):
        raise StrataError(f"archive names a file outside itself: {name!r}")
    return name


# Links followed inside a tar archive to reach a file (docker save links a layer it
# already wrote to its first copy: one hop).
_MAX_LINKS = 8
# Image indexes inside image indexes (one level is the multi-platform case).
_MAX_INDEX_DEPTH = 8


class _Bundle:
    """Named files of an archive: a directory or a (possibly compressed) tar. Only regular
    files are read: in a directory every name is walked from the archive's own directory
    without following a symlink (so a `layer.tar` symlinked out of the archive, or a FIFO,
    is refused, never opened); in a tar, links lead to other members, a few hops at most."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        if not path.is_dir():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
                self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}
            except FileNotFoundError:
                raise StrataError(f"{path}: no such file or directory") from None
            except (tarfile.TarError, EOFError, OSError) as e:
                raise StrataError(f"{path}: not an image archive ({e})") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def _dir_file(self, name: str) -> int | None:
        """An O_PATH fd of the regular file `name` in the archive directory; None if missing."""
        parts = [p for p in _safe_name(name).split("/") if p not in ("", ".")]
        if not parts:
            raise StrataError(f"{self.path}: {name!r} is not a file")
        fd = os.open(self.path, O_DIR & ~os.O_NOFOLLOW)  # the directory the user named
        try:
            for part in parts[:-1]:
                fd, above = os.open(part, O_DIR, dir_fd=fd), fd
                os.close(above)
            # O_PATH: the type is known before anything is opened for reading (a FIFO would
            # block, a device would be a device).
            found = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            reason = "a symlink" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
            raise StrataError(f"{self.path}: {name} goes through {reason}; refused") from None
        finally:
            os.close(fd)
        mode = os.fstat(found).st_mode
        if not stat.S_ISREG(mode):
            os.close(found)
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise StrataError(f"{self.path}: {name} is {kind}; refused")
        return found

    def _member(self, name: str) -> tarfile.TarInfo:
        """The regular member `name` leads to, through at most _MAX_LINKS links."""
        member = self._members.get(_safe_name(name))
        for _ in range(_MAX_LINKS + 1):
            if member is None:
                raise StrataError(f"{self.path}: missing {name}")
            if member.isreg():
                return member
            if member.issym():
                where = posixpath.dirname(member.name.removeprefix("./"))
                target = posixpath.normpath(posixpath.join(where, member.linkname))
            elif member.islnk():
                target = member.linkname.removeprefix("./")
            else:
                raise StrataError(f"{self.path}: {name} is not a regular file; refused")
            member = self._members.get(_safe_name(target))
        raise StrataError(f"{self.path}: {name}: more than {_MAX_LINKS} links to follow; refused")

    def exists(self, name: str) -> bool:
        if self._tar is not None:
            return _safe_name(name) in self._members
        fd = self._dir_file(name)
        if fd is None:
            return False
        os.close(fd)
        return True

    def open(self, name: str) -> BinaryIO:
        if self._tar is None:
            fd = self._dir_file(name)
            if fd is None:
                raise StrataError(f"{self.path}: missing {name}")
            try:
                # Reopened through /proc: the very inode checked above.
                return open(f"/proc/self/fd/{fd}", "rb")
            finally:
                os.close(fd)
        f = self._tar.extractfile(self._member(name))
        if f is None:
            raise StrataError(f"{self.path}: missing {name}")
        return f  # type: ignore[return-value]

    def size(self, name: str) -> int | None:
        """For progress only: None when unknown (a missing or refused file fails later, on open)."""
        try:
            if self._tar is not None:
                return self._member(name).size
            fd = self._dir_file(name)
        except StrataError:
            return None
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + check_digest(digest).split(":", 1)[1]


def _load_docker(store: Store, bundle: _Bundle, progress: Progress | None) -> list[tuple[str, list[str]]]:
    """manifest.json: [{Config, RepoTags, Layers}], layers old-style or as OCI blobs."""
    entries = load_json(bundle.read("manifest.json"), "manifest.json")
    if not isinstance(entries, list):
        raise StrataError("manifest.json is not a list")
    loaded = []
    for entry in entries:
        config_name = _safe_name(entry["Config"])
        stem = os.path.basename(config_name).removesuffix(".json")
        config = verify_bytes(bundle.read(config_name), f"sha256:{stem}", f"config {config_name}")
        sources = []
        for name in entry["Layers"]:
            digest = f"sha256:{os.path.basename(name)}" if name.startswith("blobs/sha256/") else None
            sources.append(LayerSource(functools.partial(bundle.open, name), digest, bundle.size(name)))
        tags = [str(reference.parse(t)) for t in entry.get("RepoTags") or []]
        loaded.append((store.add_image(config, sources, tags, progress=progress), tags))
    return loaded


def _layout_manifests(bundle: _Bundle) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """(manifest, tags) for every image of an OCI layout, nested indexes resolved for this host."""
    layout = json_object(bundle.read("oci-layout"), "oci-layout")
    if layout.get("imageLayoutVersion") != "1.0.0":
        raise StrataError(f"unsupported OCI layout version {layout.get('imageLayoutVersion')!r}")
    index = json_object(bundle.read("index.json"), "index.json")
    for desc in index.get("manifests", []):
        annotations = desc.get("annotations") or {}
        name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME, "")
        tags = []
        with contextlib.suppress(StrataError):
            if name and (":" in name or "/" in name):
                tags = [str(reference.parse(name))]
        for _ in range(_MAX_INDEX_DEPTH):
            if desc.get("mediaType") not in INDEX_TYPES:
                break
            data = verify_bytes(bundle.read(_blob_name(desc["digest"])), desc["digest"], "index")
            desc = pick_platform(json_object(data, "index"))
        else:
            raise StrataError(f"image indexes nested more than {_MAX_INDEX_DEPTH} deep")
        data = verify_bytes(bundle.read(_blob_name(desc["digest"])), desc["digest"], "manifest")
        yield parse_manifest(data), tags


def _load_layout(store: Store, bundle: _Bundle, progress: Progress | None) -> list[tuple[str, list[str]]]:
    loaded = []
    for manifest, tags in _layout_manifests(bundle):
        cdesc = manifest["config"]
        config = verify_bytes(bundle.read(_blob_name(cdesc["digest"])), cdesc["digest"], "config")
        sources = [
            LayerSource(functools.partial(bundle.open, _blob_name(d["digest"])), d["digest"], d.get("size"))
            for d in manifest["layers"]
        ]
        loaded.append((store.add_image(config, sources, tags, progress=progress), tags))
    return loaded


def load(store: Store, path: Path, progress: Progress | None = None) -> list[tuple[str, list[str]]]:
    """Load every image of a docker save archive or OCI layout (dir or tar); (id, tags) each."""
    bundle = _Bundle(path)
    try:
        if bundle.exists("manifest.json"):
            return _load_docker(store, bundle, progress)
        if bundle.exists("index.json") and bundle.exists("oci-layout"):
            return _load_layout(store, bundle, progress)
        raise StrataError(f"{path}: neither a docker save archive (manifest.json) nor an OCI layout")
    except (KeyError, TypeError, AttributeError):
        raise StrataError(f"{path}: malformed manifest") from None
    finally:
        bundle.close()


# --- writing archives and layouts -----------------------------------------------------


def _images(store: Store, refs: Sequence[str]) -> list[tuple[Image, list[str]]]:
    """Each image once, with the tags the user named (or all its tags when named by id)."""
    out: dict[str, tuple[Image, list[str]]] = {}
    for ref in refs:
        image_id = store.resolve(ref)
        img, tags = out.setdefault(image_id, (store.image(image_id), []))
        try:
            named = [str(reference.parse(ref))]
        except StrataError:
            named = []
        for t in named if named and named[0] in img.tags else img.tags:
            if t not in tags:
                tags.append(t)
    return list(out.values())


def _layout_files(store: Store, images: list[tuple[Image, list[str]]]) -> Iterator[tuple[str, bytes | Path]]:
    """The files of an OCI layout holding the images: (name, content or store file), blobs
    before index.json. Each manifest carries the tag as `org.opencontainers.image.ref.name`
    (what skopeo's `oci:DIR:TAG` looks up) and the full name for containerd and docker."""
    yield "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()
    written: set[str] = set()
    index = []
    for img, tags in images:
        manifest = oci_manifest(store, img)
        digest = sha256_bytes(manifest)
        for blob in [img.id, *(layer.blob_digest for layer in img.layers)]:
            if blob not in written:
                written.add(blob)
                yield _blob_name(blob), store.blob_path(blob)
        if digest not in written:
            written.add(digest)
            yield _blob_name(digest), manifest
        for t in tags or [""]:
            desc: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}
            if t:
                desc["annotations"] = {REF_NAME: reference.parse(t).tag, CONTAINERD_NAME: t}
            index.append(desc)
    yield "index.json", json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}).encode()


def _classic_files(
    store: Store, images: list[tuple[Image, list[str]]]
) -> Iterator[tuple[str, bytes | Layer]]:
    """docker 20.10's `docker save` form: `<id>.json` configs, `<chain-id>/layer.tar`
    uncompressed with its VERSION and v1 json, and `repositories` for old clients."""
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    for img, tags in images:
        parent = ""
        for layer in img.layers:
            lid = layer.chain_id.split(":", 1)[1]
            if lid not in written:
                written.add(lid)
                yield f"{lid}/VERSION", b"1.0"
                v1 = {"id": lid, "parent": parent} if parent else {"id": lid}
                yield f"{lid}/json", json.dumps(v1).encode()
                yield f"{lid}/layer.tar", layer
            parent = lid
        if img.id not in written:
            written.add(img.id)
            yield img.id.split(":", 1)[1] + ".json", store.read_blob(img.id)
        for t in tags:
            ref = reference.parse(t)
            repositories.setdefault(ref.name, {})[ref.tag or reference.DEFAULT_TAG] = parent
    yield "repositories", json.dumps(repositories).encode()


def _docker_manifest(images: list[tuple[Image, list[str]]], oci: bool) -> bytes:
    """manifest.json, the file `docker load` reads first in both archive forms."""
    entries = []
    for img, tags in images:
        if oci:
            config, layers = _blob_name(img.id), [_blob_name(x.blob_digest) for x in img.layers]
        else:
            config = img.id.split(":", 1)[1] + ".json"
            layers = [f"{x.chain_id.split(':', 1)[1]}/layer.tar" for x in img.layers]
        entries.append({"Config": config, "RepoTags": tags or None, "Layers": layers})
    return json.dumps(entries).encode()


def save_archive(store: Store, refs: Sequence[str], out: BinaryIO, *, oci: bool = False) -> None:
    """A `docker load` archive of the images: the classic form docker 20.10 writes, or
    (oci=True) an OCI layout plus manifest.json, the form docker 25+ writes."""
    images = _images(store, refs)
    files: Iterator[tuple[str, bytes | Path | Layer]] = (
        _layout_files(store, images) if oci else _classic_files(store, images)
    )
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, content in [*files, ("manifest.json", _docker_manifest(images, oci))]:
            parent = os.path.dirname(name)
            for i, _ in enumerate(parent.split("/") if parent else []):
                d = "/".join(parent.split("/")[: i + 1])
                if d not in dirs:
                    dirs.add(d)
                    tar.addfile(_tar_info(d + "/", 0, tarfile.DIRTYPE))
            if isinstance(content, bytes):
                tar.addfile(_tar_info(name, len(content)), io.BytesIO(content))
            elif isinstance(content, Path):
                with open(content, "rb") as f:
                    tar.addfile(_tar_info(name, os.fstat(f.fileno()).st_size), f)
            else:
                with store.open_layer_tar(content) as f:
                    tar.addfile(_tar_info(name, content.tar_size), f)


def _tar_info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """Fixed metadata, so the same images always give the same archive."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def _check_parent(dest: Path) -> None:
    if not dest.absolute().parent.is_dir():
        raise StrataError(f"{dest.absolute().parent}: no such directory")


def save_archive_file(store: Store, refs: Sequence[str], dest: Path, *, oci: bool = False) -> None:
    """save_archive to a file through common.atomic, so a failure or a crash leaves no torn archive."""
    _check_parent(dest)
    with atomic_file(dest) as f:
        save_archive(store, refs, f, oci=oci)


def save_oci_layout(store: Store, refs: Sequence[str], dest: Path) -> None:
    """An OCI image layout directory (skopeo's `oci:DIR:TAG`), built beside dest and renamed in."""
    if dest.exists():
        raise StrataError(f"{dest} already exists")
    _check_parent(dest)
    images = _images(store, refs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name, content in _layout_files(store, images):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_path(tmp)
        raise
