"""An OCI distribution (registry v2 API) client on aiohttp: pull and push images
between a registry and the store.

Pull verifies everything it receives: the manifest against the digest asked for
(or the one the registry announced), the config and each layer blob against the
manifest, each layer's tar against the config's DiffIDs. Push uploads only the
blobs the registry lacks (HEAD first), monolithically, then the OCI manifest.
Anonymous registries only: a registry asking for credentials gets a clear error."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from common.errors import StrataError
from images import reference
from images.digest import chain_ids, check_digest, sha256_bytes
from images.formats import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    json_object,
    oci_manifest,
    parse_manifest,
    pick_platform,
)
from images.store import OCI_MANIFEST, LayerSource, Store

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

_ACCEPT = ", ".join([*MANIFEST_TYPES, *INDEX_TYPES])
_CHUNK = 1 << 20
_PARALLEL = 3  # layer downloads at once, as docker does
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
# What a registry may send where nothing declares a size: docker distribution's own limit
# for manifests, and enough for any error document.
_MAX_MANIFEST = 4 << 20
_MAX_ERROR = 64 << 10


async def _read_body(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """A response body, refused past `limit` bytes: a registry is outside, it may send
    anything, and endlessly."""
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise StrataError(f"{what}: the registry sent more than {limit} bytes")
    return bytes(buf)


class _Client:
    def __init__(self, session: aiohttp.ClientSession, ref: reference.Reference, insecure: bool) -> None:
        self.session = session
        self.ref = ref
        self.base = f"{'http' if insecure else 'https'}://{ref.registry}/v2/{ref.repository}"

    async def _error(self, resp: aiohttp.ClientResponse, what: str) -> StrataError:
        if resp.status == 401:
            return StrataError(f"{what}: {self.ref.registry} wants credentials (strata is anonymous only)")
        try:
            errors = json_object(await _read_body(resp, _MAX_ERROR, what), what)["errors"]
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (StrataError, KeyError, TypeError, AttributeError):
            detail = resp.reason or ""
        return StrataError(f"{what}: registry answered {resp.status} {detail}".rstrip())

    async def request(
        self, method: str, url: str, what: str, ok: tuple[int, ...], **kw: Any
    ) -> aiohttp.ClientResponse:
        try:
            resp = await self.session.request(method, url, **kw)
        except aiohttp.ClientSSLError:
            raise StrataError(
                f"{what}: {self.ref.registry} does not speak TLS (a plain HTTP registry? use --insecure)"
            ) from None
        except aiohttp.ClientError as e:
            raise StrataError(f"{what}: cannot reach {self.ref.registry}: {e}") from None
        if resp.status not in ok:
            err = await self._error(resp, what)
            resp.release()
            raise err
        return resp

    async def manifest(self, ref: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index, digest verified."""
        what = f"manifest {self.ref.name}:{ref}" if not ref.startswith("sha256:") else f"manifest {ref}"
        headers = {"Accept": _ACCEPT}
        resp = await self.request("GET", f"{self.base}/manifests/{ref}", what, (200,), headers=headers)
        async with resp:
            body = await _read_body(resp, _MAX_MANIFEST, what)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            announced = resp.headers.get("Docker-Content-Digest")
        digest = sha256_bytes(body)
        expected = ref if ref.startswith("sha256:") else announced
        if expected is not None and check_digest(expected) != digest:
            raise StrataError(f"digest mismatch for {what}: expected {expected}, got {digest}")
        if not media_type or media_type in ("application/json", "text/plain"):
            media_type = str(json_object(body, what).get("mediaType", ""))
        return body, media_type, digest

    async def blob_bytes(self, digest: str, size: int) -> bytes:
        """A small blob (a config) of the size its descriptor declares."""
        resp = await self.request("GET", f"{self.base}/blobs/{digest}", f"blob {digest}", (200,))
        async with resp:
            data = await _read_body(resp, size, f"blob {digest}")
        if sha256_bytes(data) != digest:
            raise StrataError(f"digest mismatch for blob {digest}")
        return data

    async def download(self, digest: str, size: int, dest: Path, advance: Callable[[int], None]) -> None:
        """A blob into dest, hashed on the way; a wrong digest deletes it and fails, and so
        does a byte past the size its descriptor declares (the disk is not the registry's)."""
        h = hashlib.sha256()
        written = 0
        resp = await self.request("GET", f"{self.base}/blobs/{digest}", f"blob {digest}", (200,))
        async with resp:
            with open(dest, "wb") as f:
                async for chunk in resp.content.iter_chunked(_CHUNK):
                    written += len(chunk)
                    if written > size:
                        raise StrataError(f"blob {digest}: the registry sent more than its {size} bytes")
                    h.update(chunk)
                    f.write(chunk)
                    advance(len(chunk))
        if "sha256:" + h.hexdigest() != digest:
            dest.unlink()
            raise StrataError(f"digest mismatch for blob {digest}: got sha256:{h.hexdigest()}")

    async def has_blob(self, digest: str) -> bool:
        resp = await self.request("HEAD", f"{self.base}/blobs/{digest}", f"blob {digest}", (200, 404))
        resp.release()
        return resp.status == 200

    async def upload(self, digest: str, path: Path, advance: Callable[[int], None]) -> None:
        what = f"upload {digest}"
        resp = await self.request("POST", f"{self.base}/blobs/uploads/", what, (202,))
        location = resp.headers.get("Location")
        resp.release()
        if not location:
            raise StrataError(f"{what}: registry gave no upload location")
        url = str(resp.url.join(URL(location)))
        url += ("&" if "?" in url else "?") + f"digest={digest}"

        async def body() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    advance(len(chunk))
                    yield chunk

        size = os.path.getsize(path)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = await self.request("PUT", url, what, (201,), data=body(), headers=headers)
        resp.release()


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except aiohttp.ClientError as e:
        raise StrataError(f"registry: {e}") from None


async def _pull(store: Store, ref: reference.Reference, insecure: bool, progress: Progress | None) -> str:
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
        client = _Client(session, ref, insecure)
        body, media_type, _ = await client.manifest(ref.digest or ref.tag or reference.DEFAULT_TAG)
        if media_type in INDEX_TYPES:
            chosen = pick_platform(json_object(body, "image index"))
            body, media_type, _ = await client.manifest(check_digest(chosen["digest"]))
        if media_type not in MANIFEST_TYPES:
            raise StrataError(f"unsupported manifest type {media_type!r} (schema 2 and OCI only)")
        manifest = parse_manifest(body)
        cdesc = manifest["config"]
        config = await client.blob_bytes(check_digest(cdesc["digest"]), cdesc["size"])
        try:
            diff_ids = list(json_object(config, "image config")["rootfs"]["diff_ids"])
        except (KeyError, TypeError):
            raise StrataError("image config has no rootfs.diff_ids") from None
        if len(diff_ids) != len(manifest["layers"]):
            raise StrataError("manifest and config disagree on the number of layers")
        wanted = [
            (d, chain) for d, chain in zip(manifest["layers"], chain_ids(diff_ids), strict=True)
            if not store.has_layer(chain)
        ]
        total, done = sum(d["size"] for d, _ in wanted), 0
        room = store.layer_size_limit()
        if total > room:
            raise StrataError(f"the image's layers declare {total} bytes to download, over the {room} here")

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        with store.staging(prefix="download-") as tmp:
            paths = {check_digest(d["digest"]): tmp / d["digest"].split(":", 1)[1] for d, _ in wanted}
            sizes = {d["digest"]: d["size"] for d, _ in wanted}
            slots = asyncio.Semaphore(_PARALLEL)

            async def fetch(digest: str) -> None:
                async with slots:
                    await client.download(digest, sizes[digest], paths[digest], advance)

            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the others
                    for digest in paths:
                        group.create_task(fetch(digest))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            sources = [
                LayerSource.from_file(paths[d["digest"]], d["digest"]) if d["digest"] in paths
                else LayerSource(_already_stored, d["digest"])
                for d in manifest["layers"]
            ]
            tags = [str(ref)] if ref.tag else []
            return store.add_image(config, sources, tags)


def _already_stored() -> Any:
    """Opened only if a layer the store had when the pull began was removed meanwhile."""
    raise StrataError("a layer was removed from the store while pulling; pull again")


def pull(store: Store, ref: str, *, insecure: bool = False, progress: Progress | None = None) -> str:
    """Pull `registry/name[:tag|@digest]` into the store; returns the image id."""
    return str(_run(_pull(store, reference.parse(ref), insecure, progress)))


async def _push(store: Store, ref: reference.Reference, insecure: bool, progress: Progress | None) -> str:
    img = store.image(str(ref))
    manifest = oci_manifest(store, img)
    blobs = [(layer.blob_digest, layer.blob_size) for layer in img.layers]
    blobs.append((img.id, store.blob_path(img.id).stat().st_size))
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as session:
        client = _Client(session, ref, insecure)
        missing = [(d, s) for d, s in dict.fromkeys(blobs) if not await client.has_blob(d)]
        total, done = sum(s for _, s in missing), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        for digest, _ in missing:
            await client.upload(digest, store.blob_path(digest), advance)
        tag = ref.tag or reference.DEFAULT_TAG
        resp = await client.request(
            "PUT", f"{client.base}/manifests/{tag}", f"manifest {ref}", (201,),
            data=manifest, headers={"Content-Type": OCI_MANIFEST},
        )
        announced = resp.headers.get("Docker-Content-Digest")
        resp.release()
    digest = sha256_bytes(manifest)
    if announced and announced != digest:
        raise StrataError(f"registry stored manifest {announced}, expected {digest}")
    return digest


def push(store: Store, ref: str, *, insecure: bool = False, progress: Progress | None = None) -> str:
    """Push a local image named `registry/name[:tag]`; returns the manifest digest."""
    parsed = reference.parse(ref)
    if parsed.digest:
        raise StrataError("push needs a tag, not a digest")
    return str(_run(_push(store, parsed, insecure, progress)))
