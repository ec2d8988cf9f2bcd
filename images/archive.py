"""Layer tars in and out of the overlay on-disk format.

`apply_layer` turns an OCI layer tar (plain, gzip or zstd) into a directory
ready to be an overlay `lowerdir`: `.wh.NAME` becomes a 0/0 character device,
`.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory. Because a
layer is extracted into its own empty directory, the change-set rules reduce to
marking: an opaque marker never deletes siblings of the same layer wherever it
sits in the tar. Hostile entries are refused and the half-built tree removed:
extraction happens in a temp dir next to the destination, renamed into place
only when the whole stream was read and its digests matched.

The other direction, an upper dir to a layer tar, is `images.produce`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from common.dirwalk import O_DIR
from common.errors import StrataError
from common.tree import remove_path
from images.digest import DigestingReader, DigestingWriter
from unionfs.whiteout import (
    is_marker,
    is_private_xattr,
    is_whiteout,
    make_whiteout,
    set_opaque,
    whited_out_name,
)

# The marker formats are unionfs.whiteout's: every form read, the kernel's written.
XATTR_PAX = "SCHILY.xattr."  # how a tar carries an xattr (PAX header)
_CHUNK = 1 << 20
_SPARSE_BLOCK = 64 << 10

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class AppliedLayer:
    """What applying a layer learned: its DiffID, the digest of the bytes as given, their
    compression ("gzip", "zstd" or "" for a plain tar), the blob written to `blob_out` (if any),
    the apparent size of the files extracted and the length of the uncompressed tar."""

    diff_id: str
    source_digest: str
    compression: str
    blob_digest: str | None
    blob_size: int
    size: int
    tar_size: int


def compression_of(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return ""


def _decompressor(stream: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    return stream


def quoted(name: str) -> str:
    """A name as messages quote it: a tar can hold names of thousands of characters, and an
    error is one readable line."""
    return repr(name if len(name) <= 120 else f"{name[:50]}...{name[-50:]}")


def _parts(name: str, what: str) -> tuple[str, ...]:
    """Path components of a tar name relative to the layer root, refusing any escape."""
    if name.startswith("/"):
        raise StrataError(f"layer refused: absolute path in {what} {quoted(name)}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise StrataError(f"layer refused: '..' in {what} {quoted(name)}")
    if "\0" in name:
        raise StrataError(f"layer refused: NUL byte in {what} {quoted(name)}")
    return parts


class _Extractor:
    """Applies tar members one by one under `root`, never following a link it did not vet."""

    def __init__(self, root: Path, allow_devices: bool, max_size: int | None) -> None:
        self.root = root
        self.allow_devices = allow_devices
        self.max_size = max_size
        self.whiteouts: set[tuple[str, ...]] = set()
        self.opaque: set[tuple[str, ...]] = set()
        self.dir_times: dict[tuple[str, ...], float] = {}
        # Paths known to be real directories of this layer, each with all its parents: each
        # parent is checked once.
        self.dirs: set[tuple[str, ...]] = {()}
        self.size = 0

    def path(self, parts: tuple[str, ...]) -> Path:
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def _dir_fd(self, parts: tuple[str, ...]) -> Iterator[int]:
        """A directory of this layer, walked and checked already, open (its last component
        not followed), for the marker writers of unionfs.whiteout, which work on fds."""
        fd = os.open(self.path(parts), O_DIR)
        try:
            yield fd
        finally:
            os.close(fd)

    def _lstat(self, parts: tuple[str, ...]) -> os.stat_result | None:
        try:
            return os.lstat(self.path(parts))
        except FileNotFoundError:
            return None

    def walk_parents(self, parts: tuple[str, ...], name: str, create: bool) -> None:
        """Every parent must be a real directory of this layer (a symlink planted earlier in
        the tar is not): that is what keeps writes inside the root. Checked from below the
        deepest one known (`dirs` holds parents with their children), so a deep tree costs
        one look per entry, not one per level."""
        known = len(parts) - 1
        while known and parts[:known] not in self.dirs:
            known -= 1
        for i in range(known + 1, len(parts)):
            st = self._lstat(parts[:i])
            parent = quoted("/".join(parts[:i]))
            if st is None:
                if not create:
                    raise StrataError(f"layer refused: {quoted(name)}: {parent} does not exist")
                os.mkdir(self.path(parts[:i]), 0o755)
                self.dirs.add(parts[:i])
            elif stat.S_ISDIR(st.st_mode):
                self.dirs.add(parts[:i])
            else:
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "non-directory"
                raise StrataError(f"layer refused: {quoted(name)} goes through a {kind} {parent}")

    def _remove(self, parts: tuple[str, ...]) -> None:
        st = self._lstat(parts)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_path(self.path(parts))
            # What was recorded for the tree now gone must not be applied to its replacement.
            self.dirs = {d for d in self.dirs if d[: len(parts)] != parts}
            self.opaque = {o for o in self.opaque if o[: len(parts)] != parts}
            self.dir_times = {d: t for d, t in self.dir_times.items() if d[: len(parts)] != parts}
        else:
            os.unlink(self.path(parts))

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, "entry")
        if not parts:
            if not m.isdir():
                raise StrataError(f"layer refused: root entry {quoted(m.name)} is not a directory")
            self._meta(self.root, m)
            self.dir_times[()] = m.mtime
            return
        base = parts[-1]
        if is_marker(base):
            hidden = whited_out_name(base)
            if hidden is None:  # the opaque marker
                self.walk_parents(parts, m.name, create=True)
                self.opaque.add(parts[:-1])
            elif not is_marker(hidden):  # AUFS bookkeeping (.wh..wh.plnk) means nothing in a layer
                self.walk_parents(parts, m.name, create=True)
                self._whiteout(parts[:-1] + (hidden,), m.name)
            return
        self.walk_parents(parts, m.name, create=True)
        existing = self._lstat(parts)
        target = self.path(parts)
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self._remove(parts)
                os.mkdir(target, 0o700)
            self.dirs.add(parts)
            if parts in self.whiteouts:
                self.opaque.add(parts)  # hidden below, re-created here: nothing below shows
            self._meta(target, m)
            self.dir_times[parts] = m.mtime
            return
        self._remove(parts)
        if m.islnk():
            self._hardlink(parts, m)
            return
        if m.isreg():
            self._regular(tar, m, target)
        elif m.issym():
            os.symlink(m.linkname, target)
        elif m.ischr() or m.isblk():
            if not self.allow_devices:
                raise StrataError(f"layer refused: device node {quoted(m.name)} not allowed here")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise StrataError(f"layer refused: unsupported tar entry type {m.type!r} for {quoted(m.name)}")
        self._meta(target, m)
        self._times(target, m.mtime)

    def _whiteout(self, hidden: tuple[str, ...], name: str) -> None:
        if not hidden[-1] or hidden[-1] in (".", ".."):
            raise StrataError(f"layer refused: bad whiteout {quoted(name)}")
        self.whiteouts.add(hidden)
        st = self._lstat(hidden)
        if st is None:
            with self._dir_fd(hidden[:-1]) as fd:
                make_whiteout(fd, hidden[-1])
        elif stat.S_ISDIR(st.st_mode):
            self.opaque.add(hidden)
        # Anything else of this layer keeps its place: a whiteout only hides lower layers.

    def _regular(self, tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path) -> None:
        if self.max_size is not None and self.size + m.size > self.max_size:
            # Refused before a byte is read: a 10 KiB sparse tar can declare terabytes.
            raise StrataError(
                f"layer refused: its files declare more than {self.max_size} bytes "
                f"(at {quoted(m.name)}), the limit for a layer here"
            )
        src = tar.extractfile(m)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            # Runs of zeros become holes: a sparse file in the tar (say a 1 GB lastlog)
            # stays sparse on disk.
            hole_at_end = False
            while src is not None and (chunk := src.read(_SPARSE_BLOCK)):
                hole_at_end = chunk.count(0) == len(chunk)
                if hole_at_end:
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
            if hole_at_end:
                out.truncate()
        self.size += m.size

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        src = _parts(m.linkname, "hard link target")
        if not src:
            raise StrataError(f"layer refused: hard link {quoted(m.name)} to the layer root")
        self.walk_parents(src, m.linkname, create=False)
        st = self._lstat(src)
        if st is None:
            raise StrataError(
                f"layer refused: hard link {quoted(m.name)} to {quoted(m.linkname)}, not in this layer")
        if stat.S_ISDIR(st.st_mode) or is_whiteout(st):
            raise StrataError(f"layer refused: hard link {quoted(m.name)} to a directory or whiteout")
        os.link(self.path(src), self.path(parts), follow_symlinks=False)

    def _meta(self, target: Path, m: tarfile.TarInfo) -> None:
        os.lchown(target, m.uid, m.gid)
        for key, value in m.pax_headers.items():
            if not key.startswith(XATTR_PAX):
                continue
            name = key[len(XATTR_PAX) :]
            if is_private_xattr(name):
                raise StrataError(f"layer refused: overlay-private xattr {name} on {quoted(m.name)}")
            os.setxattr(target, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
        if not m.issym():
            os.chmod(target, m.mode & 0o7777)  # after chown, which clears set-id bits

    @staticmethod
    def _times(target: Path, mtime: float) -> None:
        ns = int(mtime * 1_000_000_000)
        os.utime(target, ns=(ns, ns), follow_symlinks=False)

    def finish(self) -> None:
        for parts in self.opaque:
            st = self._lstat(parts)
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise StrataError(
                    f"layer refused: opaque marker in {quoted('/'.join(parts))}, not a directory")
            with self._dir_fd(parts) as fd:
                set_opaque(fd)
        # Children change their parent's mtime: set directories' last, deepest first.
        for parts in sorted(self.dir_times, key=len, reverse=True):
            self._times(self.path(parts), self.dir_times[parts])


def apply_layer(
    source: BinaryIO,
    dest: Path,
    *,
    allow_devices: bool = True,
    expected_digest: str | None = None,
    expected_diff_id: str | None = None,
    blob_out: BinaryIO | None = None,
    max_size: int | None = None,
) -> AppliedLayer:
    """Extract a layer tar from `source` into the new directory `dest`, all or nothing.

    `expected_digest` is checked against the bytes as given, `expected_diff_id` against the
    uncompressed tar. `blob_out`, when given, receives a compressed copy to keep: the source
    bytes themselves when already compressed, a gzip of them otherwise. `max_size` bounds
    what the files may declare in all (apparent sizes), checked before each is extracted."""
    if dest.exists() or dest.is_symlink():
        raise StrataError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # the root of every container built on it, unless the tar says otherwise
        head = source.read(4)
        compression = compression_of(head)
        blob_writer = DigestingWriter(blob_out) if blob_out is not None else None
        gz = None
        if blob_writer is not None and not compression:
            # Level 3: three times faster than 6 for 8% more bytes (import speed matters more).
            gz = gzip.GzipFile(fileobj=blob_writer, mode="wb", compresslevel=3, mtime=0)
        raw = DigestingReader(_Prefixed(head, source), blob_writer if compression else None)  # type: ignore[arg-type]
        buffered = io.BufferedReader(raw, _CHUNK)
        diff = DigestingReader(_decompressor(buffered, compression), gz)  # type: ignore[arg-type]
        ex = _Extractor(tmp, allow_devices, max_size)
        where = ""  # the entry being applied, for messages
        try:
            with tarfile.open(fileobj=diff, mode="r|", errorlevel=2) as tar:  # type: ignore[call-overload]
                for member in tar:
                    where = member.name
                    ex.add(tar, member)
            where = ""
            diff.drain()
            buffered.read()  # bytes after the compressed stream still count for the digest
            ex.finish()
        except (tarfile.TarError, EOFError, zstandard.ZstdError) as e:
            raise StrataError(f"layer refused: not a valid layer tar: {e}") from None
        except OSError as e:
            at = f"{quoted(where)}: " if where else ""
            raise StrataError(f"layer refused: {at}{e.strerror or e}") from None
        diff_id = diff.verify(expected_diff_id, "layer (diff id)")
        source_digest = raw.verify(expected_digest, "layer blob")
        if gz is not None:
            gz.close()
        os.rename(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):  # what resists is swept with the staging dir
            remove_path(tmp)
        raise
    return AppliedLayer(
        diff_id=diff_id,
        source_digest=source_digest,
        compression=compression,
        blob_digest=blob_writer.digest() if blob_writer else None,
        blob_size=blob_writer.size if blob_writer else 0,
        size=ex.size,
        tar_size=diff.size,
    )


class _Prefixed(io.RawIOBase):
    """The bytes already read to sniff the compression, then the rest of the stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        super().__init__()
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buf))
        buf[: len(data)] = data
        return len(data)
