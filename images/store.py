"""The layer store: content-addressed layers and the images that stack them.

On disk, under `<state_root>`:

    layers/sha256/<chain-id hex>/diff        the extracted tree, overlay format, a lowerdir
    layers/sha256/<chain-id hex>/layer.json  DiffID, parent ChainID, kept blob, apparent size
    blobs/sha256/<hex>                       image configs and compressed layer blobs
    images/sha256/<image-id hex>.json        one file per image (image id = config digest)
    repositories.json                        {"name:tag": image id}
    tmp/                                     staging; everything is renamed into place

A layer is keyed by ChainID, so the same layer under two images is stored once.
Reference counts are not kept as counters that a crash could leave wrong: every
removal recomputes, under the store lock, the set of layers and blobs the
remaining images reach, and frees exactly the rest.

`Store` is one class of ~420 lines on purpose: every change it makes takes the
same store lock and ends in the same garbage collection, and splitting layers,
images, tags and holds apart would spread that invariant over several classes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import gzip
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from common.atomic import fsync_dir, write_atomic
from common.errors import StrataError
from common.parsing import load_json, parse_size
from common.paths import STATE_ROOT_MODE, private_dir, state_root
from common.tree import remove_path
from images import reference
from images.archive import apply_layer
from images.digest import DIGEST_RE, chain_id, chain_ids, check_digest, sha256_bytes
from images.produce import produce_layer

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Layer:
    chain_id: str
    diff_id: str
    parent: str | None
    blob_digest: str
    media_type: str
    blob_size: int
    size: int
    tar_size: int
    path: Path

    @property
    def diff(self) -> Path:
        """The extracted tree: what goes in `lowerdir`."""
        return self.path / "diff"


@dataclass(frozen=True)
class LayerSource:
    """A layer blob to add: how to open it and what it must hash to (None: not known)."""

    open: Callable[[], BinaryIO]
    digest: str | None = None
    size: int | None = None

    @classmethod
    def from_file(cls, path: Path, digest: str | None = None) -> LayerSource:
        return cls(functools.partial(Path.open, path, "rb"), digest, path.stat().st_size)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Image:
    id: str
    tags: list[str]
    config: dict[str, Any]
    layers: list[Layer]

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def created(self) -> str:
        return str(self.config.get("created", ""))

    @property
    def lowerdirs(self) -> list[Path]:
        """The layer trees top first, as overlay's (and strata-unionfs's) `lowerdir=` lists them."""
        return [layer.diff for layer in reversed(self.layers)]


def _hex(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def host_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


class _Counting:
    """Reports bytes read to a progress callback."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self._raw, self._progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._progress(len(data))
        return data


def _remove_quietly(path: Path) -> None:
    """Remove a scratch or doomed tree, leaving what resists for the next writer's sweep."""
    with contextlib.suppress(OSError):
        remove_path(path)


class Store:
    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, max_layer_size: int | None = None
    ) -> None:
        self.root = state_root(root)
        env_limit = os.environ.get("STRATA_MAX_LAYER_SIZE")
        if max_layer_size is None and env_limit:
            max_layer_size = parse_size(env_limit, "$STRATA_MAX_LAYER_SIZE")
        self.max_layer_size = max_layer_size
        self.layers_dir = self.root / "layers" / "sha256"
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.images_dir = self.root / "images" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.holds_dir = self.root / "holds"
        self.repositories_file = self.root / "repositories.json"
        # Root only (DESIGN, threat model): 0710 on the state root, the way to volume
        # mountpoints (see volumes.state); everything of the store 0700.
        private_dir(os.path.realpath(self.root), STATE_ROOT_MODE)
        for d in (self.layers_dir, self.blobs_dir, self.images_dir):
            private_dir(d.parent)
            private_dir(d)
        for d in (self.tmp_dir, self.holds_dir):
            private_dir(d)

    # --- locking and staging -------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time: adding an image and collecting garbage must not interleave."""
        with open(self.root / "store.lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            # All staging happens under this lock: whatever is in tmp/ now, a crash left behind,
            # and it goes whatever it holds (deep trees included); what cannot go yet (say a
            # mount someone made inside) waits for the next writer instead of failing this one.
            for leftover in self.tmp_dir.iterdir():
                if leftover.name.startswith(("stage-", "deleting-")):
                    _remove_quietly(leftover)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self, prefix: str = "stage-") -> Iterator[Path]:
        """A scratch dir on the store's filesystem (so renames into place are atomic). Under the
        lock use the default prefix (crash leftovers are swept); unlocked work such as downloads
        passes another one."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        try:
            yield path
        finally:
            _remove_quietly(path)

    def layer_size_limit(self) -> int:
        """What the files of one layer may declare in all: the configured maximum
        ($STRATA_MAX_LAYER_SIZE), else the free space of the store's filesystem, since a
        layer declaring more could only fill the disk (or take hours to read)."""
        if self.max_layer_size is not None:
            return self.max_layer_size
        st = os.statvfs(self.tmp_dir)
        return st.f_bavail * st.f_frsize

    # --- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise StrataError(f"blob {digest} not in the store") from None

    def _put_blob(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        if not self.has_blob(digest):
            write_atomic(self.blob_path(digest), data)
        return digest

    # --- layers --------------------------------------------------------------------------

    def layer(self, chain_id: str) -> Layer:
        path = self.layers_dir / _hex(chain_id)
        try:
            meta = json.loads((path / "layer.json").read_text())
        except FileNotFoundError:
            raise StrataError(f"layer {chain_id} not in the store") from None
        return Layer(
            chain_id=meta["chain_id"],
            diff_id=meta["diff_id"],
            parent=meta["parent"],
            blob_digest=meta["blob_digest"],
            media_type=meta["media_type"],
            blob_size=meta["blob_size"],
            size=meta["size"],
            tar_size=meta["tar_size"],
            path=path,
        )

    def has_layer(self, chain_id: str) -> bool:
        return (self.layers_dir / _hex(chain_id) / "layer.json").exists()

    def add_layer(
        self,
        parent: str | None,
        source: LayerSource,
        *,
        diff_id: str | None = None,
        progress: Progress | None = None,
    ) -> Layer:
        """Apply a layer blob on top of `parent` (a ChainID) unless the store has it already.

        The blob is verified against `source.digest` and the tar against `diff_id` when known;
        a compressed copy is kept for save and push. Call with the store locked."""
        if parent is not None and not self.has_layer(parent):
            raise StrataError(f"parent layer {parent} not in the store")
        if diff_id is not None:
            chain = chain_id(parent, diff_id)
            if self.has_layer(chain):
                return self.layer(chain)
        with self.staging() as stage, open(stage / "blob", "wb") as blob:
            raw = source.open()
            try:
                stream: Any = _Counting(raw, progress) if progress else raw
                applied = apply_layer(
                    stream, stage / "layer" / "diff", expected_digest=source.digest,
                    expected_diff_id=diff_id, blob_out=blob, max_size=self.layer_size_limit(),
                )
            finally:
                raw.close()
            # Durable before it is renamed into place, as every state write is.
            blob.flush()
            os.fsync(blob.fileno())
            blob.close()
            assert applied.blob_digest is not None
            chain = chain_id(parent, applied.diff_id)
            meta = {
                "chain_id": chain,
                "diff_id": applied.diff_id,
                "parent": parent,
                "blob_digest": applied.blob_digest,
                "media_type": LAYER_MEDIA_TYPES[applied.compression or "gzip"],
                "blob_size": applied.blob_size,
                "size": applied.size,
                "tar_size": applied.tar_size,
            }
            write_atomic(stage / "layer" / "layer.json", json.dumps(meta, indent=1).encode())
            if not self.has_blob(applied.blob_digest):
                os.rename(stage / "blob", self.blob_path(applied.blob_digest))
                fsync_dir(self.blobs_dir)
            if not self.has_layer(chain):
                os.rename(stage / "layer", self.layers_dir / _hex(chain))
                fsync_dir(self.layers_dir)
        return self.layer(chain)

    def open_layer_tar(self, layer: Layer) -> BinaryIO:
        """The layer as an uncompressed tar stream (what DiffID hashes), for `docker save`."""
        path = self.blob_path(layer.blob_digest)
        if layer.media_type.endswith("+zstd"):
            f = open(path, "rb")  # noqa: SIM115 - closed with the stream (closefd)
            return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=True)
        return gzip.open(path, "rb")  # type: ignore[return-value]

    # --- images --------------------------------------------------------------------------

    def _repositories(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.repositories_file.read_text()))
        except FileNotFoundError:
            return {}

    def _save_repositories(self, repos: dict[str, str]) -> None:
        write_atomic(self.repositories_file, json.dumps(repos, indent=1, sort_keys=True).encode())

    def image_ids(self) -> list[str]:
        return sorted("sha256:" + p.stem for p in self.images_dir.glob("*.json"))

    def image(self, ref: str) -> Image:
        """An image by id, id prefix or name[:tag]."""
        image_id = ref
        if not (DIGEST_RE.match(ref) and (self.images_dir / f"{_hex(ref)}.json").exists()):
            image_id = self.resolve(ref)
        config = json.loads(self.read_blob(image_id))
        layers = [self.layer(c) for c in chain_ids(config["rootfs"]["diff_ids"])]
        tags = sorted(t for t, i in self._repositories().items() if i == image_id)
        return Image(image_id, tags, config, layers)

    def images(self) -> list[Image]:
        return [self.image(i) for i in self.image_ids()]

    def resolve(self, ref: str) -> str:
        """An image id from `name[:tag]`, a full id or a unique id prefix (as docker accepts)."""
        repos = self._repositories()
        with contextlib.suppress(StrataError):
            key = str(reference.parse(ref))
            if key in repos:
                return repos[key]
        want = ref.removeprefix("sha256:")
        if len(want) >= 4 and all(c in "0123456789abcdef" for c in want):
            found = [i for i in self.image_ids() if i.split(":", 1)[1].startswith(want)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise StrataError(f"image id prefix {ref!r} is ambiguous")
        raise StrataError(f"no such image: {ref}")

    def add_image(
        self,
        config_bytes: bytes,
        layers: Sequence[LayerSource],
        tags: Sequence[str] = (),
        *,
        progress: Progress | None = None,
    ) -> str:
        """Record an image from its config and layer blobs (bottom first), all verified."""
        config = load_json(config_bytes, "image config")
        try:
            diff_ids = list(config["rootfs"]["diff_ids"])
        except (KeyError, TypeError):
            raise StrataError("image config has no rootfs.diff_ids") from None
        if len(diff_ids) != len(layers):
            raise StrataError(f"image config lists {len(diff_ids)} layers, the image has {len(layers)}")
        keys = [str(reference.parse(t)) for t in tags]
        with self.locked():
            try:
                parent: str | None = None
                for diff_id, source in zip(diff_ids, layers, strict=True):
                    parent = self.add_layer(parent, source, diff_id=diff_id, progress=progress).chain_id
                return self._record_image(config_bytes, keys)
            except BaseException:
                # All or nothing: the layers (and blobs) stored before a later one was refused
                # belong to no image, and go with it.
                self._collect_garbage()
                raise

    def _record_image(self, config_bytes: bytes, keys: Sequence[str]) -> str:
        """The image exists once its config blob and record are in place (store locked)."""
        image_id = self._put_blob(config_bytes)
        write_atomic(self.images_dir / f"{_hex(image_id)}.json", json.dumps({"id": image_id}).encode())
        self._retag(image_id, keys)
        return image_id

    def _retag(self, image_id: str, keys: Sequence[str]) -> None:
        """Point tags at image_id; an image left with no tag and nothing else is freed then."""
        if not keys:
            return
        repos = self._repositories()
        previous = {repos.get(k) for k in keys} - {None, image_id}
        repos.update(dict.fromkeys(keys, image_id))
        self._save_repositories(repos)
        for old in previous:
            assert old is not None
            if old not in repos.values() and not self.holders(old):
                (self.images_dir / f"{_hex(old)}.json").unlink(missing_ok=True)  # dangling, docker keeps it
                self._collect_garbage()

    def new_image_config(
        self,
        diff_ids: Sequence[str],
        history: Sequence[dict[str, Any]],
        base: dict[str, Any] | None = None,
        container_config: dict[str, Any] | None = None,
    ) -> bytes:
        """A config (image-spec config.md) for diff_ids: the base's settings plus new history."""
        config = dict(base or {})
        config.setdefault("architecture", host_architecture())
        config.setdefault("os", "linux")
        config["created"] = _now()
        settings = dict(config.get("config") or {"Env": [DEFAULT_PATH_ENV]})
        settings.update(container_config or {})
        config["config"] = settings
        config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
        config["history"] = list(config.get("history") or []) + list(history)
        return json.dumps(config, separators=(",", ":")).encode()

    def import_rootfs(self, source: Path, tag: str | None, *, progress: Progress | None = None) -> str:
        """A one-layer image from a rootfs tarball (plain, gzip, zstd) or a directory."""
        keys = [str(reference.parse(tag))] if tag else []
        created_by = f"strata image import {source.name}"
        with self.locked(), self.staging() as stage:
            if source.is_dir():
                tar_path = stage / "rootfs.tar"
                with open(tar_path, "wb") as out:
                    produce_layer(source, out)
                source = tar_path
            elif not source.is_file():
                raise StrataError(f"{source}: no such file or directory")
            layer = self.add_layer(None, LayerSource.from_file(source), progress=progress)
            hist = {"created": _now(), "created_by": created_by}
            return self._record_image(self.new_image_config([layer.diff_id], [hist]), keys)

    def commit(
        self,
        parent_image: str | None,
        upper: Path,
        *,
        created_by: str,
        tag: str | None = None,
        comment: str = "",
        author: str = "",
        container_config: dict[str, Any] | None = None,
    ) -> str:
        """A new image: parent's layers plus the layer made from a container's upper dir."""
        keys = [str(reference.parse(tag))] if tag else []
        with self.locked(), self.staging() as stage:
            base = self.image(parent_image) if parent_image else None
            tar_path = stage / "layer.tar"
            with open(tar_path, "wb") as out:
                produce_layer(upper, out, base.lowerdirs if base else [])
            parent = base.layers[-1].chain_id if base and base.layers else None
            layer = self.add_layer(parent, LayerSource.from_file(tar_path))
            diff_ids = [x.diff_id for x in base.layers] if base else []
            hist: dict[str, Any] = {"created": _now(), "created_by": created_by}
            if comment:
                hist["comment"] = comment
            if author:
                hist["author"] = author
            config = self.new_image_config(
                [*diff_ids, layer.diff_id], [hist], base.config if base else None, container_config
            )
            return self._record_image(config, keys)

    def tag(self, source_ref: str, target: str) -> str:
        with self.locked():
            image_id = self.resolve(source_ref)
            self._retag(image_id, [str(reference.parse(target))])
        return image_id

    def remove(self, ref: str, *, force: bool = False) -> list[str]:
        """docker rmi: `name:tag` drops that tag and the image with its last tag; an id removes
        the image (all tags only with force). A held image is refused (force: untagged only,
        freed at its last release). Returns docker-style "Untagged:/Deleted:" lines."""
        out: list[str] = []
        with self.locked():
            image_id = self.resolve(ref)
            repos = self._repositories()
            tags = [t for t, i in repos.items() if i == image_id]
            with contextlib.suppress(StrataError):
                key = str(reference.parse(ref))
                if key in tags:
                    tags = [key]
            if len(tags) > 1 and not force:
                raise StrataError(
                    f"image {image_id[7:19]} is referenced by {len(tags)} tags ({', '.join(sorted(tags))}): "
                    "remove them by name or use --force"
                )
            users = self.holders(image_id)
            if users and not (force and tags):
                raise StrataError(
                    f"image {image_id[7:19]} is in use by {', '.join(users)}: remove those first"
                    + ("" if force else " (--force only untags it)")
                )
            for t in tags:
                del repos[t]
                out.append(f"Untagged: {t}")
            self._save_repositories(repos)
            if image_id not in repos.values() and not users:
                (self.images_dir / f"{_hex(image_id)}.json").unlink()
                out.append(f"Deleted: {image_id}")
                out += [f"Deleted: {c}" for c in self._collect_garbage()]
        return out

    # --- holds: users of an image's layers (containers) ----------------------------------

    def _hold_path(self, holder: str) -> Path:
        if not reference.valid_holder(holder):
            raise StrataError(f"invalid holder name {holder!r}")
        return self.holds_dir / holder

    def hold(self, holder: str, ref: str) -> str:
        """Pin an image for something mounting its layers (a container, by id): rmi will not
        delete it, and its layers stay, until `release(holder)`. Returns the image id."""
        with self.locked():
            image_id = self.resolve(ref)
            write_atomic(self._hold_path(holder), image_id.encode())
        return image_id

    def release(self, holder: str) -> None:
        """Drop a hold; an image left untagged and unheld is freed with its unused layers."""
        with self.locked():
            path = self._hold_path(holder)
            try:
                image_id = path.read_text()
            except FileNotFoundError:
                return
            path.unlink()
            if image_id not in self._repositories().values() and not self.holders(image_id):
                (self.images_dir / f"{_hex(image_id)}.json").unlink(missing_ok=True)
                self._collect_garbage()

    def holders(self, image_id: str) -> list[str]:
        return sorted(p.name for p in self.holds_dir.iterdir() if p.read_text() == image_id)

    def _collect_garbage(self) -> list[str]:
        """Free every layer and blob no remaining image reaches; returns the freed ChainIDs."""
        live_layers: set[str] = set()
        live_blobs: set[str] = set()
        for image_id in self.image_ids():
            live_blobs.add(_hex(image_id))
            config = json.loads(self.read_blob(image_id))
            for chain in chain_ids(config["rootfs"]["diff_ids"]):
                live_layers.add(_hex(chain))
                live_blobs.add(_hex(self.layer(chain).blob_digest))
        freed = []
        for path in sorted(self.layers_dir.iterdir()):
            if path.name not in live_layers:
                # Rename first: a crash mid-delete leaves a tmp dir, never a half layer.
                doomed = self.tmp_dir / f"deleting-{path.name}"
                os.rename(path, doomed)
                _remove_quietly(doomed)
                freed.append(f"sha256:{path.name}")
        for path in self.blobs_dir.iterdir():
            if path.name not in live_blobs:
                path.unlink()
        return freed
