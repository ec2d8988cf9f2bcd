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
import errno
import functools
import gzip
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from common.dirwalk import O_DIR, DirStack
from common.errors import StrataError
from common.tree import remove_path
from images.digest import DigestingReader, DigestingWriter
from unionfs.whiteout import (
    OPAQUE_MARKER,
    has_opaque_xattr,
    is_marker,
    is_private_xattr,
    is_whiteout,
    make_whiteout,
    set_opaque,
    whited_out_name,
    whiteout_marker,
)

# The marker formats are unionfs.whiteout's: every form read, the kernel's written.
_REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")
_XATTR_PAX = "SCHILY.xattr."
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


def _q(name: str) -> str:
    """A name as messages quote it: a tar can hold names of thousands of characters, and an
    error is one readable line."""
    return repr(name if len(name) <= 120 else f"{name[:50]}...{name[-50:]}")


def _parts(name: str, what: str) -> tuple[str, ...]:
    """Path components of a tar name relative to the layer root, refusing any escape."""
    if name.startswith("/"):
        raise StrataError(f"layer refused: absolute path in {what} {_q(name)}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise StrataError(f"layer refused: '..' in {what} {_q(name)}")
    if "\0" in name:
        raise StrataError(f"layer refused: NUL byte in {what} {_q(name)}")
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
            parent = _q("/".join(parts[:i]))
            if st is None:
                if not create:
                    raise StrataError(f"layer refused: {_q(name)}: {parent} does not exist")
                os.mkdir(self.path(parts[:i]), 0o755)
                self.dirs.add(parts[:i])
            elif stat.S_ISDIR(st.st_mode):
                self.dirs.add(parts[:i])
            else:
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "non-directory"
                raise StrataError(f"layer refused: {_q(name)} goes through a {kind} {parent}")

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
                raise StrataError(f"layer refused: root entry {_q(m.name)} is not a directory")
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
                raise StrataError(f"layer refused: device node {_q(m.name)} not allowed here")
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise StrataError(f"layer refused: unsupported tar entry type {m.type!r} for {_q(m.name)}")
        self._meta(target, m)
        self._times(target, m.mtime)

    def _whiteout(self, hidden: tuple[str, ...], name: str) -> None:
        if not hidden[-1] or hidden[-1] in (".", ".."):
            raise StrataError(f"layer refused: bad whiteout {_q(name)}")
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
                f"(at {_q(m.name)}), the limit for a layer here"
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
            raise StrataError(f"layer refused: hard link {_q(m.name)} to the layer root")
        self.walk_parents(src, m.linkname, create=False)
        st = self._lstat(src)
        if st is None:
            raise StrataError(f"layer refused: hard link {_q(m.name)} to {_q(m.linkname)}, not in this layer")
        if stat.S_ISDIR(st.st_mode) or is_whiteout(st):
            raise StrataError(f"layer refused: hard link {_q(m.name)} to a directory or whiteout")
        os.link(self.path(src), self.path(parts), follow_symlinks=False)

    def _meta(self, target: Path, m: tarfile.TarInfo) -> None:
        os.lchown(target, m.uid, m.gid)
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            name = key[len(_XATTR_PAX) :]
            if is_private_xattr(name):
                raise StrataError(f"layer refused: overlay-private xattr {name} on {_q(m.name)}")
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
                raise StrataError(f"layer refused: opaque marker in {_q('/'.join(parts))}, not a directory")
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
            at = f"{_q(where)}: " if where else ""
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


def _xattrs(path: str, follow_symlinks: bool = False) -> dict[str, bytes]:
    """Every xattr of path, its last component not followed unless asked (see _fd_xattrs)."""
    try:
        names = os.listxattr(path, follow_symlinks=follow_symlinks)
    except OSError:
        return {}
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=follow_symlinks)
    return out


def _fd_xattrs(fd: int) -> dict[str, bytes]:
    """Every xattr of the inode an fd holds, an O_PATH one included (even a symlink's:
    /proc/self/fd/N leads to that inode and no further)."""
    return _xattrs(f"/proc/self/fd/{fd}", follow_symlinks=True)


def _is_opaque(path: str) -> bool:
    """Every opaque-directory form of a lower dir (the xattrs, the OCI marker file)."""
    return has_opaque_xattr(path) or os.path.lexists(os.path.join(path, OPAQUE_MARKER))


def _hidden_by(names: Iterable[str]) -> set[str]:
    """The names the OCI whiteout files among names hide (the opaque marker hides none)."""
    return {hidden for n in names if is_marker(n) and (hidden := whited_out_name(n)) is not None}


def _reader(path: str, follow: bool) -> Callable[[], BinaryIO]:
    """What opens path for reading when called: its last component not followed, unless it
    is a /proc/self/fd/N, which must be followed to reach the inode N holds."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)

    def read() -> BinaryIO:
        return os.fdopen(os.open(path, flags), "rb")

    return read


def _marker(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """An empty OCI whiteout / opaque marker entry."""
    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.uname, info.gname = int(st.st_mtime), 0o600, "", ""
    return info


# What a rename or removal under a walk makes it meet.
_CHANGED = (errno.ENOENT, errno.ESTALE, errno.ENOTDIR, errno.ELOOP)


@dataclass
class _Frame:
    """A directory being written: `rel` its name in the tar ("" or ending in "/"); `upper`
    whether it is the upper's directory the DirStack stands in (else it shows lower content
    only); `lower_rel` where it shows in the lower stack; `merged` whether it is inside a
    renamed dir (written with everything it shows); `todo` its names still to write, last
    first; `in_upper` the upper's names; `lower` the lower entries it shows (when merged)."""

    rel: str
    upper: bool
    lower_rel: str
    merged: bool
    todo: list[str]
    in_upper: set[str]
    lower: dict[str, str]


class _Producer:
    """Writes the entries of an upper dir, and, below a directory the kernel renamed
    (`redirect_dir=on`), the full merged content that directory shows.

    The upper may be a running container's, as deep as it likes and changing meanwhile, so
    it is read anchored: a stack of frames instead of recursion, every entry opened with
    O_PATH|O_NOFOLLOW from its directory's fd (the entry's type, metadata, data, link target
    and xattrs all come from that one open inode), every directory entered through a
    DirStack. A concurrent rename can make the walk fail; it can never make it read a file
    through a symlink or outside the upper. The lower layers are the store's own, immutable,
    and read by path."""

    def __init__(self, tar: tarfile.TarFile, lowers: Sequence[Path], dirs: DirStack) -> None:
        self.tar = tar
        self.lowers = [str(p) for p in lowers]
        self.seen_inodes: dict[tuple[int, int], str] = {}
        self.dirs = dirs
        self.current = ""  # the entry being written, for messages

    def _info(self, rel: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        info.pax_headers = {
            _XATTR_PAX + name: value.decode("utf-8", "surrogateescape")
            for name, value in xattrs.items()
            if not is_private_xattr(name)
        }
        return info

    def _non_dir(
        self, rel: str, st: os.stat_result, xattrs: dict[str, bytes],
        data: Callable[[], BinaryIO], link: Callable[[], str],
    ) -> None:
        """One entry that is not a directory; `data` opens a regular file's content, `link`
        reads a symlink's target, both from the inode `st` describes."""
        info = self._info(rel, st, xattrs)
        mode = st.st_mode
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.seen_inodes:
            info.type, info.linkname = tarfile.LNKTYPE, self.seen_inodes[key]
            self.tar.addfile(info)
            return
        self.seen_inodes[key] = rel
        if stat.S_ISREG(mode):
            info.size = st.st_size
            with data() as f:
                self.tar.addfile(info, f)
            return
        if stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, link()
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.tar.addfile(info)

    def _dir(self, rel: str, st: os.stat_result, xattrs: dict[str, bytes], opaque: bool) -> None:
        info = self._info(rel + "/", st, xattrs)
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
                if os.path.lexists(os.path.join(path, whiteout_marker(part))):
                    return out
                path = os.path.join(path, part)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    path = ""
                    break
                if not stat.S_ISDIR(st.st_mode):
                    return out  # a whiteout or a file hides everything below it
                cut = cut or (i < len(parts) - 1 and _is_opaque(path))
            if path:
                out.append(path)
                if _is_opaque(path):
                    return out
            if cut:
                return out
        return out

    def _lower_children(self, lower_rel: str) -> dict[str, str]:
        found: dict[str, str] = {}
        hidden: set[str] = set()
        for d in self._lower_dirs(lower_rel):
            for name in os.listdir(d):
                if name in found or name in hidden:
                    continue
                if is_marker(name):
                    hidden |= _hidden_by([name])
                    continue
                if is_whiteout(os.lstat(os.path.join(d, name))):
                    hidden.add(name)
                else:
                    found[name] = os.path.join(d, name)
        return {k: v for k, v in found.items() if k not in hidden}

    def _frame(self, rel: str, upper: bool, lower_rel: str, merged: bool) -> _Frame:
        """A directory's frame. Not merged: the upper's own entries, markers as OCI
        whiteouts. Merged (inside a renamed dir, written opaque): everything the directory
        shows, upper entries over those of the lower dir at lower_rel."""
        in_upper = set(os.listdir(self.dirs.fd())) if upper else set()
        lower = self._lower_children(lower_rel) if merged else {}
        hidden = _hidden_by(in_upper) if merged else set()
        todo = sorted((in_upper | set(lower)) - hidden - {OPAQUE_MARKER}, reverse=True)
        return _Frame(rel, upper, lower_rel, merged, todo, in_upper, lower)

    def run(self) -> None:
        """Write everything, depth first, each directory's names sorted."""
        frames = [self._frame("", True, "", merged=False)]
        while frames:
            f = frames[-1]
            if not f.todo:
                frames.pop()
                if f.upper and frames:
                    self.dirs.pop()
                continue
            name = f.todo.pop()
            rel, child_lower = f"{f.rel}{name}", f"{f.lower_rel}/{name}"
            self.current = rel
            if name in f.in_upper:
                child = self._upper_entry(f, name, rel, child_lower)
            else:
                child = self._lower_entry(rel, f.lower[name], child_lower)
            if child is not None:
                frames.append(child)

    def _upper_entry(self, f: _Frame, name: str, rel: str, child_lower: str) -> _Frame | None:
        """Write one entry of the upper's current directory; the frame to enter if it is one."""
        cur = self.dirs.fd()
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
        try:
            st = os.fstat(fd)
            if is_whiteout(st) or (f.merged and is_marker(name)):
                if not f.merged:
                    self.tar.addfile(_marker(f"{f.rel}{whiteout_marker(name)}", st))
                return None
            if stat.S_ISSOCK(st.st_mode):
                return None
            if not stat.S_ISDIR(st.st_mode):
                # Reopened through /proc: the very inode fstat'ed, whatever the name is now.
                self._non_dir(
                    rel, st, _fd_xattrs(fd),
                    _reader(f"/proc/self/fd/{fd}", follow=True),
                    functools.partial(os.readlink, "", dir_fd=fd),
                )
                return None
        finally:
            os.close(fd)
        entered = self.dirs.push(name)
        if (entered.st_dev, entered.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(errno.ESTALE, "replaced while being read")
        xa = _fd_xattrs(self.dirs.fd())
        redirect = next((xa[n] for n in _REDIRECT_XATTRS if n in xa), None)
        opaque = has_opaque_xattr(self.dirs.fd())
        if not opaque:
            with contextlib.suppress(FileNotFoundError):
                os.lstat(OPAQUE_MARKER, dir_fd=self.dirs.fd())
                opaque = True
        if redirect is not None and not opaque:
            if not self.lowers:
                raise StrataError(f"cannot make a layer of {_q(rel)}: a renamed lower dir (give its lowers)")
            # Absolute: from the root of the stack; relative: a sibling in the lower parent.
            target = os.fsdecode(redirect)
            origin = target if target.startswith("/") else f"{f.lower_rel}/{target}"
            self._dir(rel, st, xa, opaque=True)
            return self._frame(rel + "/", True, origin.strip("/"), merged=True)
        self._dir(rel, st, xa, opaque=opaque and not f.merged)
        return self._frame(rel + "/", True, child_lower.strip("/"), merged=f.merged and not opaque)

    def _lower_entry(self, rel: str, path: str, lower_rel: str) -> _Frame | None:
        """A lower entry inside a renamed dir: written out with everything it shows."""
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            return None
        if not stat.S_ISDIR(st.st_mode):
            self._non_dir(
                rel, st, _xattrs(path),
                _reader(path, follow=False), functools.partial(os.readlink, path),
            )
            return None
        self._dir(rel, st, _xattrs(path), opaque=False)
        return self._frame(rel + "/", False, lower_rel.strip("/"), merged=True)


def produce_layer(upper: Path, out: BinaryIO, lowers: Sequence[Path] = ()) -> str:
    """Write the OCI layer tar of an overlay upper dir to `out`; return its DiffID.

    Whiteout devices become `.wh.NAME`, opaque dirs get a `.wh..wh..opq` entry, hard links
    inside the upper stay links. A directory the kernel renamed (a redirect xattr) is written
    opaque with its whole merged content, read through `lowers` (top first, as `lowerdir`).
    Entries are sorted and owner names left out, so the same upper always gives the same tar
    (and DiffID). Sockets are skipped, as docker does. The upper is read anchored (_Producer):
    one that changes meanwhile may make this fail, with a one-line StrataError."""
    writer = DigestingWriter(out)
    try:
        top = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise StrataError(f"cannot make a layer of {upper}: {e.strerror}") from None
    producer = None
    try:
        with DirStack(top) as dirs, tarfile.open(  # type: ignore[call-overload]
            fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT
        ) as tar:
            producer = _Producer(tar, lowers, dirs)
            producer.run()
    except OSError as e:
        at = f" at {_q(producer.current)}" if producer and producer.current else ""
        hint = " (changed while being read)" if e.errno in _CHANGED else ""
        raise StrataError(f"cannot make a layer of {upper}{at}: {e.strerror or e}{hint}") from None
    finally:
        os.close(top)
    return writer.digest()
