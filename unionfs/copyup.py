"""Copy-up: bring a lower file into the upper before its first change.

Every copy is built in the work directory and renamed into the upper in one
step, so a crash at any moment leaves either the lower file showing or the
complete copy, never a torn file (leftovers in the work directory are removed
at the next mount). Data moves by reflink (FICLONE) where the filesystem
shares extents, else copy_file_range, else sendfile. Mode, owner, timestamps
and xattrs (except the overlay's own) go along.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
import stat

from .whiteout import is_private_xattr

FICLONE = 0x40049409
_CHUNK = 1 << 30


class WorkDir:
    """The scratch directory on the upper's filesystem (`WORKDIR/work`, as the kernel uses)."""

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(os.path.abspath(workdir), "work")
        self._seq = itertools.count()
        if os.path.lexists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
            if os.path.lexists(self.path):  # a non-directory left there
                os.unlink(self.path)
        os.mkdir(self.path, 0o000)

    def temp(self) -> str:
        return f"{self.path}/#strata-{os.getpid()}-{next(self._seq)}"

    def discard(self, path: str) -> None:
        """Remove something moved into the work directory to be thrown away."""
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    off = 0
    try:
        while off < size:
            n = os.copy_file_range(src_fd, dst_fd, min(size - off, _CHUNK), off, off)
            if n == 0:
                break
            off += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while off < size:
        n = os.sendfile(dst_fd, src_fd, off, min(size - off, _CHUNK))
        if n == 0:
            break
        off += n


def copy_xattrs(src: str, dst: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), follow_symlinks=False)
        except OSError as e:
            # security.* labels may be refused by the upper's filesystem; the data is what matters.
            if e.errno not in (errno.ENOTSUP, errno.EPERM) or not name.startswith("security."):
                raise


def copy_metadata(st: os.stat_result, src: str | None, dst: str) -> None:
    """Owner, then mode (chown clears set-id bits), xattrs, then times last."""
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    if src is not None:
        copy_xattrs(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def make_copy(src: str, st: os.stat_result, dst: str, data: bool, fsync: bool) -> None:
    """Create at dst (in the work dir) a copy of src: data (unless told the
    caller is about to truncate it anyway), then metadata."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if data and st.st_size:
                sfd = os.open(src, os.O_RDONLY)
                try:
                    copy_data(sfd, fd, st.st_size)
                finally:
                    os.close(sfd)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    elif stat.S_ISDIR(mode):
        os.mkdir(dst, 0o700)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    else:
        os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
    copy_metadata(st, src, dst)


def copy_up(work: WorkDir, src: str, st: os.stat_result, dst: str, data: bool = True,
            fsync: bool = True) -> os.stat_result:
    """Copy src into the upper at dst atomically; returns the new file's lstat."""
    tmp = work.temp()
    try:
        make_copy(src, st, tmp, data, fsync)
        os.rename(tmp, dst)
    except BaseException:
        work.discard(tmp)
        raise
    return os.lstat(dst)
