"""Copy-up: bring a lower file into the upper before its first change.

`CopyUp` is the collaborator the FUSE operations are handed (wired in
`UnionFS.__init__`): it copies a node and the directories above it, a whole
directory for a rename (all or nothing), and says when a file's open handles
must move to the copy; the functions below it copy one file.

Every copy is built in the work directory and renamed into the upper in one
step, so a crash at any moment leaves either the lower file showing or the
complete copy, never a torn file (leftovers in the work directory are removed
at the next mount). Data moves by reflink (FICLONE) where the filesystem
shares extents, else copy_file_range, else sendfile, extent by extent
(SEEK_DATA/SEEK_HOLE), so holes stay holes as with the kernel: a 1 GiB sparse
lower file copies up into 4 KiB. Mode, owner, timestamps and xattrs (except
the overlay's own) go along.

Every access is anchored: the source is a name in a lower directory fd,
opened without following a symlink and checked to be the file that was looked
up; the copy is a name in the work directory's fd.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat
from collections.abc import Callable, Generator

from common.dirwalk import O_DIR
from common.tree import remove_tree

from .inodes import InodeTable, Node
from .layers import UPPER, Entry, Ident, at, ident, open_checked, open_dir, stale
from .whiteout import is_private_xattr, set_opaque

FICLONE = 0x40049409
_CHUNK = 1 << 30


class WorkDir:
    """The scratch directory on the upper's filesystem (`WORKDIR/work`, as the kernel uses)."""

    NAME = "work"

    def __init__(self, workdir: str) -> None:
        self.parent = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._seq = itertools.count()
        remove_tree(self.parent, self.NAME)
        os.mkdir(self.NAME, 0o000, dir_fd=self.parent)
        self.fd = open_dir(self.parent, self.NAME)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.parent)

    def temp(self) -> str:
        """A fresh name in the work directory."""
        return f"#strata-{os.getpid()}-{next(self._seq)}"

    def discard(self, name: str) -> None:
        """Remove something moved into the work directory to be thrown away."""
        remove_tree(self.fd, name)


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    off = start
    try:
        while off < end:
            n = os.copy_file_range(src_fd, dst_fd, min(end - off, _CHUNK), off, off)
            if n == 0:
                return
            off += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(dst_fd, off, os.SEEK_SET)
    while off < end:
        n = os.sendfile(dst_fd, src_fd, off, min(end - off, _CHUNK))
        if n == 0:
            return
        off += n


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy size bytes, keeping holes: the data extents only, then the length."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: nothing but a hole up to the end
                raise
            break
        hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, data, hole)
        off = hole
    os.ftruncate(dst_fd, size)


def copy_xattrs(src: str | int, dst: str | int) -> None:
    """Copy the xattrs of src to dst: fds, or anchored paths never followed."""
    def flw(target: str | int) -> dict[str, bool]:
        return {} if isinstance(target, int) else {"follow_symlinks": False}

    try:
        names = os.listxattr(src, **flw(src))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, **flw(src)), **flw(dst))
        except OSError as e:
            # security.* labels may be refused by the upper's filesystem; the data is what matters.
            if e.errno not in (errno.ENOTSUP, errno.EPERM) or not name.startswith("security."):
                raise


class Copy:
    """One node's copy in the work directory, made in steps: created (__init__),
    filled (`fill`: the data and its fsync, the long part, which touches only
    this object's own fds, so it may run in a worker thread while the request
    loop goes on), sealed (`seal`: owner, mode (chown clears set-id bits),
    xattrs, times last) and renamed into the upper (`into`), or discarded."""

    def __init__(self, work: WorkDir, src_dir: int, name: str, st: os.stat_result,
                 data: bool, fsync: bool) -> None:
        """Create the copy of `name` in `src_dir`, which must still be the file `st`
        describes; its data only if `data` (not when the caller truncates it anyway)."""
        self.work, self.src_dir, self.name, self.st = work, src_dir, name, st
        self.tmp = work.temp()
        self.data, self.fsync = data, fsync
        self.fd: int | None = None
        self.src_fd: int | None = None
        mode = st.st_mode
        try:
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                self.src_fd = open_checked(src_dir, name, O_DIR if stat.S_ISDIR(mode) else os.O_RDONLY,
                                           ident(st))
            if stat.S_ISREG(mode):
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o600, dir_fd=work.fd)
            elif stat.S_ISDIR(mode):
                os.mkdir(self.tmp, 0o700, dir_fd=work.fd)
                self.fd = open_dir(work.fd, self.tmp)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=src_dir), self.tmp, dir_fd=work.fd)
            else:
                os.mknod(self.tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=work.fd)
        except BaseException:
            self.discard()
            raise

    @property
    def long(self) -> bool:
        """Whether `fill` does slow work: data to copy, or an fsync (a journal commit)."""
        return stat.S_ISREG(self.st.st_mode) and (self.fsync or (self.data and self.st.st_size > 0))

    def fill(self) -> None:
        """The data (holes kept) and, when asked, its fsync; discarded if that fails."""
        if not stat.S_ISREG(self.st.st_mode):
            return
        assert self.fd is not None and self.src_fd is not None
        try:
            if self.data and self.st.st_size:
                copy_data(self.src_fd, self.fd, self.st.st_size)
            if self.fsync:
                os.fsync(self.fd)
        except BaseException:
            self.discard()
            raise

    def seal(self) -> None:
        st, work, tmp, fd = self.st, self.work, self.tmp, self.fd
        os.chown(tmp, st.st_uid, st.st_gid, dir_fd=work.fd, follow_symlinks=False)
        if fd is not None:
            os.chmod(fd, stat.S_IMODE(st.st_mode))
        elif not stat.S_ISLNK(st.st_mode):
            os.chmod(at(work.fd, tmp), stat.S_IMODE(st.st_mode))  # our own node, not a symlink
        copy_xattrs(at(self.src_dir, self.name) if self.src_fd is None else self.src_fd,
                    at(work.fd, tmp) if fd is None else fd)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work.fd, follow_symlinks=False)
        self._close()

    def into(self, dst_dir: int) -> os.stat_result:
        """Rename the sealed copy into the upper directory `dst_dir` under its name;
        returns its lstat. The upper parent keeps its times, as with the kernel: a
        copy-up is not a change of the directory, and a layer committed from the
        upper must not say so."""
        pst = os.fstat(dst_dir)
        os.rename(self.tmp, self.name, src_dir_fd=self.work.fd, dst_dir_fd=dst_dir)
        os.utime(dst_dir, ns=(pst.st_atime_ns, pst.st_mtime_ns))
        return os.stat(self.name, dir_fd=dst_dir, follow_symlinks=False)

    def discard(self) -> None:
        self._close()
        self.work.discard(self.tmp)

    def _close(self) -> None:
        for f in (self.fd, self.src_fd):
            if f is not None:
                os.close(f)
        self.fd = self.src_fd = None


def copy_up(work: WorkDir, src_dir: int, name: str, st: os.stat_result, dst_dir: int,
            data: bool = True, fsync: bool = True) -> os.stat_result:
    """Copy `name` from `src_dir` into the upper directory `dst_dir` atomically,
    all steps in a row; returns the new file's lstat."""
    copy = Copy(work, src_dir, name, st, data, fsync)
    try:
        copy.fill()
        copy.seal()
        return copy.into(dst_dir)
    except BaseException:
        copy.discard()
        raise


# Nodes a copy-up brought into the upper, with the layer and identity each had (to undo).
CopyLog = list[tuple[Node, int, Ident]]


class CopyUp:
    """Brings nodes of the merged view into the upper, anchored as everything
    else: the source through its parent's lower directory fd, checked to be the
    file the node was looked up as; the copy through the upper parent's fd."""

    def __init__(self, table: InodeTable, work: WorkDir, fsync: bool,
                 moved: Callable[[Node, int], None]) -> None:
        self.table = table
        self.work = work
        self.fsync = fsync
        # Called once a file has its upper copy (node, upper parent fd): open handles move to it.
        self.moved = moved

    def node(self, node: Node, data: bool = True, log: CopyLog | None = None) -> None:
        """Bring node, and the directories above it first, into the upper; with
        `log`, note each node copied and where it was before (to undo)."""
        if node.in_upper:
            return
        chain = []
        n: Node | None = node
        while n is not None and not n.in_upper:
            chain.append(n)
            n = n.parent
        for n in reversed(chain):
            copy = self.begin(n, data or n is not node)
            copy.fill()
            self.end(n, copy, log)

    def begin(self, node: Node, data: bool) -> Copy:
        """Start the copy of node, whose directories above must be in the upper
        already: checked to be the file it was looked up as, created in the work
        directory. Then `fill` it (anywhere) and hand it to `end`."""
        assert node.parent is not None and not node.unlinked
        src_dir = self.table.dirfd(node.parent, node.layer)
        lst = os.stat(node.name, dir_fd=src_dir, follow_symlinks=False)
        if ident(lst) != node.ident:
            raise stale(node.name)
        return Copy(self.work, src_dir, node.name, lst, data and not node.is_dir,
                    self.fsync and not node.is_dir)

    def end(self, node: Node, copy: Copy, log: CopyLog | None = None) -> None:
        """Seal a filled copy and put it in place of node (its open handles move to it);
        with `log`, note where node was before (to undo)."""
        assert node.parent is not None
        before = (node, node.layer, node.ident)
        try:
            copy.seal()
            dst_dir = self.table.dirfd(node.parent, UPPER)
            ust = copy.into(dst_dir)
        except BaseException:
            copy.discard()
            raise
        self.table.copied_up(node, ust)
        if not node.is_dir:
            self.moved(node, dst_dir)
        if log is not None:
            log.append(before)

    def undo(self, log: CopyLog) -> None:
        """Remove the copies noted in log, newest first: the upper is as it was
        (parents keep their times), and the view never changed."""
        for node, layer, was in reversed(log):
            assert node.parent is not None
            ufd = self.table.dirfd(node.parent, UPPER)
            pst = os.fstat(ufd)
            if node.is_dir:
                os.rmdir(node.name, dir_fd=ufd)
            else:
                os.unlink(node.name, dir_fd=ufd)
            os.utime(ufd, ns=(pst.st_atime_ns, pst.st_mtime_ns))
            self.table.uncopied(node, layer, was)

    def walk(self, top: Node) -> Generator[tuple[Node, Entry], None, None]:
        """The nodes below top that a lower layer has a part in (an upper-only file
        needs no copy), each directory before what is in it. The nodes attached for
        the walk are dropped again when it ends, unless the kernel knows them."""
        stack = self.table.stack
        seen: list[Node] = []
        todo = [top]
        try:
            while todo:
                d = todo.pop()
                view = self.table.view(d)
                for name in stack.listing(view):
                    entry = stack.child(view, name)
                    if entry is None or (entry.layer == UPPER and not entry.lowers):
                        continue
                    child = self.table.attach(d, name, entry)
                    seen.append(child)
                    yield child, entry
                    if entry.is_dir:
                        todo.append(child)
        finally:
            for child in seen:
                self.table.drop_unused(child)

    def tree(self, node: Node) -> None:
        """Bring a whole merged directory into the upper, so it can be renamed
        as one upper directory, marked opaque: nothing below shows through, and
        the whiteouts in it (no longer needed) go. All or nothing: a failure
        (ENOSPC) takes back every copy made, as a redirect would have needed none."""
        log: CopyLog = []
        dirs = [node]
        walk = self.walk(node)
        try:
            self.node(node, log=log)
            for child, entry in walk:
                self.node(child, log=log)
                if entry.is_dir:
                    dirs.append(child)
        except BaseException:
            self.undo(log)
            raise
        finally:
            walk.close()
        for d in dirs:
            ufd = self.table.dirfd(d, UPPER)
            for name in self.table.stack.upper_whiteouts(ufd):
                os.unlink(name, dir_fd=ufd)
            set_opaque(ufd)
            d.lowers = ()
