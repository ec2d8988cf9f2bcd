"""An overlay upper dir to the OCI layer tar that, applied over the same
lower layers, gives back the merged tree (commit, diff, export): whiteouts
become `.wh.NAME`, opaque directories `.wh..wh..opq`, hard links stay links;
the upper is read anchored to fds, without recursion (see `produce_layer`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from common.dirwalk import DirStack
from common.errors import StrataError
from images.archive import XATTR_PAX, quoted
from images.digest import DigestingWriter
from unionfs.whiteout import (
    OPAQUE_MARKER,
    has_opaque_xattr,
    is_marker,
    is_private_xattr,
    is_whiteout,
    whited_out_name,
    whiteout_marker,
)

_REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")


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
            XATTR_PAX + name: value.decode("utf-8", "surrogateescape")
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
                raise StrataError(
                    f"cannot make a layer of {quoted(rel)}: a renamed lower dir (give its lowers)")
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
        at = f" at {quoted(producer.current)}" if producer and producer.current else ""
        hint = " (changed while being read)" if e.errno in _CHANGED else ""
        raise StrataError(f"cannot make a layer of {upper}{at}: {e.strerror or e}{hint}") from None
    finally:
        os.close(top)
    return writer.digest()
