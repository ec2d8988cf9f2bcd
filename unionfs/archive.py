"""Layer tars in and out of the overlay on-disk format.

`apply_layer` turns an OCI layer tar (plain, gzip or zstd) into a directory
ready to be an overlay `lowerdir`: `.wh.NAME` becomes a 0/0 character device,
`.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory. Because a
layer is extracted into its own empty directory, the change-set rules reduce to
marking: an opaque marker never deletes siblings of the same layer wherever it
sits in the tar. Hostile entries are refused and the half-built tree removed:
extraction happens in a temp dir next to the destination, renamed into place
only when the whole stream was read and its digests matched.

`produce_layer` walks an overlay upper dir and writes the OCI tar that, applied
over the same lower layers, gives back the merged tree.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from unionfs.digest import DigestingReader, DigestingWriter
from unionfs.errors import StrataError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Opaque markers other writers put on upper dirs; all are read when producing a layer.
_OPAQUE_XATTRS = (OPAQUE_XATTR, "user.overlay.opaque", "user.fuseoverlayfs.opaque")
# Overlay-private xattrs: never copied into a tar, never accepted from one.
_PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
_REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
_XATTR_PAX = "SCHILY.xattr."
_CHUNK = 1 << 20

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


def _parts(name: str, what: str) -> tuple[str, ...]:
    """Path components of a tar name relative to the layer root, refusing any escape."""
    if name.startswith("/"):
        raise StrataError(f"layer refused: absolute path in {what} {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise StrataError(f"layer refused: '..' in {what} {name!r}")
    if "\0" in name:
        raise StrataError(f"layer refused: NUL byte in {what} {name!r}")
    return parts


class _Extractor:
    """Applies tar members one by one under `root`, never following a link it did not vet."""

    def __init__(self, root: Path, allow_devices: bool) -> None:
        self.root = root
        self.allow_devices = allow_devices
        self.whiteouts: set[tuple[str, ...]] = set()
        self.opaque: set[tuple[str, ...]] = set()
        self.dir_times: dict[tuple[str, ...], float] = {}
        self.size = 0

    def path(self, parts: tuple[str, ...]) -> Path:
        return self.root.joinpath(*parts)

    def _lstat(self, parts: tuple[str, ...]) -> os.stat_result | None:
        try:
            return os.lstat(self.path(parts))
        except FileNotFoundError:
            return None

    def walk_parents(self, parts: tuple[str, ...], name: str, create: bool) -> None:
        """Every parent must be a real directory of this layer (a symlink planted earlier in
        the tar is not): that is what keeps writes inside the root."""
        for i in range(1, len(parts)):
            st = self._lstat(parts[:i])
            if st is None:
                if not create:
                    raise StrataError(f"layer refused: {name!r}: {'/'.join(parts[:i])} does not exist")
                os.mkdir(self.path(parts[:i]), 0o755)
            elif not stat.S_ISDIR(st.st_mode):
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "non-directory"
                raise StrataError(f"layer refused: {name!r} goes through a {kind} {'/'.join(parts[:i])!r}")

    def _remove(self, parts: tuple[str, ...]) -> None:
        st = self._lstat(parts)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(self.path(parts))
            self.opaque = {o for o in self.opaque if o[: len(parts)] != parts}
        else:
            os.unlink(self.path(parts))

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, "entry")
        if not parts:
            if not m.isdir():
                raise StrataError(f"layer refused: root entry {m.name!r} is not a directory")
            self._meta(self.root, m)
            self.dir_times[()] = m.mtime
            return
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self.walk_parents(parts, m.name, create=True)
            self.opaque.add(parts[:-1])
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs): no meaning in a layer
        self.walk_parents(parts, m.name, create=True)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts[:-1] + (base[len(WHITEOUT_PREFIX) :],), m.name)
            return
        existing = self._lstat(parts)
        target = self.path(parts)
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self._remove(parts)
                os.mkdir(target, 0o700)
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
                raise StrataError(f"layer refused: device node {m.name!r} not allowed here")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise StrataError(f"layer refused: unsupported tar entry type {m.type!r} for {m.name!r}")
        self._meta(target, m)
        self._times(target, m.mtime)

    def _whiteout(self, hidden: tuple[str, ...], name: str) -> None:
        if not hidden[-1] or hidden[-1] in (".", ".."):
            raise StrataError(f"layer refused: bad whiteout {name!r}")
        self.whiteouts.add(hidden)
        st = self._lstat(hidden)
        if st is None:
            os.mknod(self.path(hidden), stat.S_IFCHR | 0o000, os.makedev(0, 0))
        elif stat.S_ISDIR(st.st_mode):
            self.opaque.add(hidden)
        # Anything else of this layer keeps its place: a whiteout only hides lower layers.

    def _regular(self, tar: tarfile.TarFile, m: tarfile.TarInfo, target: Path) -> None:
        src = tar.extractfile(m)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            if src is not None:
                shutil.copyfileobj(src, out, _CHUNK)
        self.size += m.size

    def _hardlink(self, parts: tuple[str, ...], m: tarfile.TarInfo) -> None:
        src = _parts(m.linkname, "hard link target")
        if not src:
            raise StrataError(f"layer refused: hard link {m.name!r} to the layer root")
        self.walk_parents(src, m.linkname, create=False)
        st = self._lstat(src)
        if st is None:
            raise StrataError(f"layer refused: hard link {m.name!r} to {m.linkname!r}, not in this layer")
        if stat.S_ISDIR(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
            raise StrataError(f"layer refused: hard link {m.name!r} to a directory or whiteout")
        os.link(self.path(src), self.path(parts), follow_symlinks=False)

    def _meta(self, target: Path, m: tarfile.TarInfo) -> None:
        os.lchown(target, m.uid, m.gid)
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX) :]
            if name.startswith(_PRIVATE_XATTR_PREFIXES):
                raise StrataError(f"layer refused: overlay-private xattr {name} on {m.name!r}")
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
                raise StrataError(f"layer refused: opaque marker in {'/'.join(parts)!r}, not a directory")
            os.setxattr(self.path(parts), OPAQUE_XATTR, b"y")
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
) -> AppliedLayer:
    """Extract a layer tar from `source` into the new directory `dest`, all or nothing.

    `expected_digest` is checked against the bytes as given, `expected_diff_id` against the
    uncompressed tar. `blob_out`, when given, receives a compressed copy to keep: the source
    bytes themselves when already compressed, a gzip of them otherwise."""
    if dest.exists() or dest.is_symlink():
        raise StrataError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        head = source.read(4)
        compression = compression_of(head)
        blob_writer = DigestingWriter(blob_out) if blob_out is not None else None
        gz = None
        if blob_writer is not None and not compression:
            gz = gzip.GzipFile(fileobj=blob_writer, mode="wb", mtime=0)
        raw = DigestingReader(_Prefixed(head, source), blob_writer if compression else None)  # type: ignore[arg-type]
        buffered = io.BufferedReader(raw, _CHUNK)
        diff = DigestingReader(_decompressor(buffered, compression), gz)  # type: ignore[arg-type]
        ex = _Extractor(tmp, allow_devices)
        try:
            with tarfile.open(fileobj=diff, mode="r|", errorlevel=2) as tar:  # type: ignore[call-overload]
                for member in tar:
                    ex.add(tar, member)
            diff.drain()
            buffered.read()  # bytes after the compressed stream still count for the digest
        except (tarfile.TarError, EOFError, zstandard.ZstdError) as e:
            raise StrataError(f"layer refused: not a valid layer tar: {e}") from None
        except OSError as e:
            raise StrataError(f"layer refused: {e}") from None
        ex.finish()
        diff_id = diff.verify(expected_diff_id, "layer (diff id)")
        source_digest = raw.verify(expected_digest, "layer blob")
        if gz is not None:
            gz.close()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def is_opaque(path: str, xattrs: dict[str, bytes] | None = None) -> bool:
    """Every opaque-directory form an upper may carry (kernel, fuse-overlayfs, OCI marker file)."""
    xa = _xattrs(path) if xattrs is None else xattrs
    if any(xa.get(name) == b"y" for name in _OPAQUE_XATTRS):
        return True
    return os.path.lexists(os.path.join(path, OPAQUE_MARKER))


def _marker(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """An empty OCI whiteout / opaque marker entry."""
    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.uname, info.gname = int(st.st_mtime), 0o600, "", ""
    return info


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Producer:
    """Writes the entries of an upper dir, and, below a directory the kernel renamed
    (`redirect_dir=on`), the full merged content that directory shows."""

    def __init__(self, tar: tarfile.TarFile, lowers: Sequence[Path]) -> None:
        self.tar = tar
        self.lowers = [str(p) for p in lowers]
        self.seen_inodes: dict[tuple[int, int], str] = {}

    def _info(self, rel: str, path: str, st: os.stat_result) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        info.pax_headers = {
            _XATTR_PAX + name: value.decode("utf-8", "surrogateescape")
            for name, value in _xattrs(path).items()
            if not name.startswith(_PRIVATE_XATTR_PREFIXES)
        }
        return info

    def _non_dir(self, rel: str, path: str, st: os.stat_result) -> None:
        info = self._info(rel, path, st)
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.seen_inodes:
            info.type, info.linkname = tarfile.LNKTYPE, self.seen_inodes[key]
            self.tar.addfile(info)
            return
        self.seen_inodes[key] = rel
        if stat.S_ISREG(mode):
            info.size = st.st_size
            with open(path, "rb") as f:
                self.tar.addfile(info, f)
            return
        if stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.tar.addfile(info)

    def _dir(self, rel: str, path: str, st: os.stat_result, opaque: bool) -> None:
        info = self._info(rel + "/", path, st)
        info.type = tarfile.DIRTYPE
        self.tar.addfile(info)
        if opaque:
            self.tar.addfile(_marker(f"{rel}/{OPAQUE_MARKER}", st))

    def _lower_dirs(self, lower_rel: str) -> list[str]:
        """The lower dirs, top first, whose entries show at lower_rel in the lower stack."""
        parts = [p for p in lower_rel.split("/") if p]
        out: list[str] = []
        for layer in self.lowers:
            path, cut = layer, False
            for i, part in enumerate(parts):
                if os.path.lexists(os.path.join(path, WHITEOUT_PREFIX + part)):
                    return out
                path = os.path.join(path, part)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    path = ""
                    break
                if not stat.S_ISDIR(st.st_mode):
                    return out  # a whiteout or a file hides everything below it
                cut = cut or (i < len(parts) - 1 and is_opaque(path))
            if path:
                out.append(path)
                if is_opaque(path):
                    return out
            if cut:
                return out
        return out

    def _lower_children(self, lower_rel: str) -> dict[str, str]:
        found: dict[str, str] = {}
        hidden: set[str] = set()
        for d in self._lower_dirs(lower_rel):
            for name in os.listdir(d):
                if name == OPAQUE_MARKER or name in found or name in hidden:
                    continue
                if name.startswith(WHITEOUT_PREFIX):
                    hidden.add(name[len(WHITEOUT_PREFIX) :])
                    continue
                if _is_whiteout(os.lstat(os.path.join(d, name))):
                    hidden.add(name)
                else:
                    found[name] = os.path.join(d, name)
        return {k: v for k, v in found.items() if k not in hidden}

    def walk(self, rel_dir: str, upper_dir: str | None, lower_rel: str, merged: bool) -> None:
        """Entries of one directory. Not merged: the upper's own entries, markers as OCI
        whiteouts. Merged (inside a renamed dir, emitted opaque): everything the directory
        shows, upper entries over those of the lower dir at lower_rel."""
        upper = sorted(os.listdir(upper_dir)) if upper_dir else []
        lower = self._lower_children(lower_rel) if merged else {}
        hidden = {n[len(WHITEOUT_PREFIX) :] for n in upper if merged and n.startswith(WHITEOUT_PREFIX)}
        for name in sorted(set(upper) | set(lower)):
            if name == OPAQUE_MARKER or name in hidden:
                continue
            rel, child_lower = f"{rel_dir}{name}", f"{lower_rel}/{name}"
            if name not in upper or upper_dir is None:
                self._whole(rel, lower[name], child_lower)
                continue
            path = os.path.join(upper_dir, name)
            st = os.lstat(path)
            if _is_whiteout(st) or (merged and name.startswith(WHITEOUT_PREFIX)):
                if not merged:
                    self.tar.addfile(_marker(f"{rel_dir}{WHITEOUT_PREFIX}{name}", st))
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue
            if not stat.S_ISDIR(st.st_mode):
                self._non_dir(rel, path, st)
                continue
            xa = _xattrs(path)
            redirect = next((xa[n] for n in _REDIRECT_XATTRS if n in xa), None)
            opaque = is_opaque(path, xa)
            if redirect is not None and not opaque:
                if not self.lowers:
                    raise StrataError(f"cannot make a layer of {rel}: a renamed lower dir (give its lowers)")
                # Absolute: from the root of the stack; relative: a sibling in the lower parent.
                target = os.fsdecode(redirect)
                origin = target if target.startswith("/") else f"{lower_rel}/{target}"
                self._dir(rel, path, st, opaque=True)
                self.walk(rel + "/", path, origin.strip("/"), merged=True)
            else:
                self._dir(rel, path, st, opaque=opaque and not merged)
                self.walk(rel + "/", path, child_lower.strip("/"), merged=merged and not opaque)

    def _whole(self, rel: str, path: str, lower_rel: str) -> None:
        """A lower entry inside a renamed dir: written out with everything it shows."""
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            return
        if not stat.S_ISDIR(st.st_mode):
            self._non_dir(rel, path, st)
            return
        self._dir(rel, path, st, opaque=False)
        self.walk(rel + "/", None, lower_rel.strip("/"), merged=True)


def produce_layer(upper: Path, out: BinaryIO, lowers: Sequence[Path] = ()) -> str:
    """Write the OCI layer tar of an overlay upper dir to `out`; return its DiffID.

    Whiteout devices become `.wh.NAME`, opaque dirs get a `.wh..wh..opq` entry, hard links
    inside the upper stay links. A directory the kernel renamed (a redirect xattr) is written
    opaque with its whole merged content, read through `lowers` (top first, as `lowerdir`).
    Entries are sorted and owner names left out, so the same upper always gives the same tar
    (and DiffID). Sockets are skipped, as docker does."""
    writer = DigestingWriter(out)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        _Producer(tar, lowers).walk("", str(upper), "", merged=False)
    return writer.digest()
