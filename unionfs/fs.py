"""The FUSE operations of strata-unionfs, over the layer stack, the inode table
and copy-up.

Every host access is anchored (see layers.py): a node is reached through its
parent's directory fd and its name, checked against the identity it was
looked up with, or through the fd of one of its open handles once it has no
name. A rename or unlink by anyone, inside the mount or on the host, can make
an operation fail with ENOENT or ESTALE, never redirect it to another file.

The daemon is the only writer of its upper and lower layers never change, so
the kernel is told to cache entries, attributes and pages for `timeout`
seconds (fuse-overlayfs's default: 10^9 s); every change passes through the
kernel, which updates its own caches as it goes. The one exception is
copy-up: a file's pages cached from the lower copy are dropped when it is
copied up, and its open handles are moved to the upper copy.

One class of ~750 lines, because pyfuse3 dispatches every request to one
Operations object; it is grouped by kind of request (lookup and attributes,
new entries, removal and rename, files, directories, xattrs), and what is not
a request lives in its collaborators (layers, inodes, copyup).
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields, StatvfsData

from common.kernel import RENAME_EXCHANGE, RENAME_WHITEOUT, fallocate, renameat2

from .copyup import CopyLog, CopyUp, WorkDir
from .inodes import InodeTable, Node
from .layers import UPPER, Entry, LayerStack, at, ident, open_checked, open_dir, stale
from .options import MountOptions
from .whiteout import is_private_xattr, is_whiteout, make_whiteout, set_opaque

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
# Flags of the client's open that are not for the backing file: the kernel has
# done O_CREAT/O_EXCL, and O_DIRECT is the kernel's business (our reads and
# writes go to the backing file at any alignment; the client's O_DIRECT
# requests still bypass the FUSE page cache).
_NOT_BACKING = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT
_BACKING = os.O_NOFOLLOW | os.O_CLOEXEC


class _Busy(Exception):
    """A request met a node that long work (a copy-up) is changing: it waits
    for that work, then starts over. Raised before the request changed anything."""

    def __init__(self, done: trio.Event) -> None:
        super().__init__()
        self.done = done


def _guarded(cls: type[pyfuse3.Operations]) -> type[pyfuse3.Operations]:
    """Wrap every FUSE handler so that no exception can end the session loop:
    real-filesystem errors reach the caller as the same errno, and a bug costs
    one request (EIO, logged), not the whole mount. A request that meets a busy
    node detaches from the request loop, waits for it and starts over (requests
    on one node that must not overlap are serialized). After each request the
    directory-fd cache is trimmed to its bound."""
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and hasattr(pyfuse3.Operations, name):
            def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
                @functools.wraps(fn)
                async def handler(self: UnionFS, *args: Any) -> Any:
                    try:
                        while True:
                            try:
                                return await fn(self, *args)
                            except _Busy as busy:
                                await pyfuse3.detach()
                                await busy.done.wait()
                    except FUSEError:
                        raise
                    except OSError as e:
                        raise FUSEError(e.errno or errno.EIO) from e
                    except RecursionError as e:
                        raise FUSEError(errno.ELOOP) from e
                    except Exception as e:
                        log.exception("internal error")
                        raise FUSEError(errno.EIO) from e
                    finally:
                        self.table.trim()
                return handler
            setattr(cls, name, wrap(fn))
    return cls


@dataclass
class DirHandle:
    node: Node
    names: list[str] | None = None


@dataclass
class FileHandle:
    node: Node
    fd: int
    flags: int


@dataclass
class Io:
    """How the kernel does I/O on the open files of one inode: all through one
    backing file (passthrough, `backing` > 0), or all through requests. The
    kernel refuses a second backing file for an inode, and a passthrough open
    beside one that uses the page cache (the open fails with EIO)."""

    backing: int
    opens: int = 0


@_guarded
class UnionFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, opts: MountOptions) -> None:
        super().__init__()
        self.opts = opts
        self.stack = LayerStack(opts.upperdir, opts.lowerdirs)
        self.readonly = opts.readonly or opts.upperdir is None
        self.work = WorkDir(opts.workdir) if opts.workdir and not self.readonly else None
        self.table = InodeTable(self.stack, self.stack.root_entry())
        self.copyup = CopyUp(self.table, self.work, opts.fsync, self._moved) if self.work else None
        self.handles: dict[int, DirHandle | FileHandle] = {}
        self.io: dict[int, Io] = {}  # by inode number, while it has open files
        self.enable_passthrough = opts.passthrough
        # Nodes with long work in flight (by inode number), set when it is done.
        self.busy: dict[int, trio.Event] = {}
        self._next_fh = 1
        self.timeout = opts.timeout

    def _open_file(self, node: Node, fd: int, flags: int, keep_cache: bool) -> FileInfo:
        """The handle of a new open of a regular file, and how the kernel is to do
        its I/O: through one backing file per inode (passthrough), or through
        requests, as every other open of that inode already does.

        Passthrough only where no copy-up can follow: a file in the upper layer,
        or any file of a read-only mount. The kernel keeps an open file on the
        backing file it was given and allows one per inode, so a lower file open
        that way when another process first writes it could neither move to the
        copy (readers left on old data) nor let the writer open the copy (the
        kernel answers EBUSY, or EINVAL for a non-passthrough open beside it).
        The kernel refuses FOPEN_KEEP_CACHE with passthrough (EIO): not set."""
        io = self.io.get(node.ino)
        if io is None:
            io = self.io[node.ino] = Io(self._backing(node, fd))
        io.opens += 1
        fh = self._fh(FileHandle(node, fd, flags))
        if io.backing:
            return FileInfo(fh=fh, keep_cache=False, backing_id=io.backing)
        return FileInfo(fh=fh, keep_cache=keep_cache)

    def _backing(self, node: Node, fd: int) -> int:
        if not (self.opts.passthrough and (node.in_upper or self.readonly)):
            return 0
        if not pyfuse3.passthrough_enabled():
            return 0
        try:
            return pyfuse3.passthrough_open(fd)
        except OSError as e:  # a backing file the kernel will not stack on: requests, as before
            log.debug("no passthrough for %s: %s", node.name, e)
            return 0

    def _closed_file(self, node: Node) -> None:
        io = self.io.get(node.ino)
        if io is None:
            return
        io.opens -= 1
        if io.opens <= 0:
            del self.io[node.ino]
            if io.backing:
                pyfuse3.passthrough_close(io.backing)

    def close(self) -> None:
        """Close every fd this mount holds in its layers (the session is over)."""
        for h in self.handles.values():
            if isinstance(h, FileHandle):
                os.close(h.fd)
        self.handles.clear()
        self.table.close()
        if self.work is not None:
            self.work.close()
        self.stack.close()

    # ---- helpers -------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.table.nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        if self.busy:
            self._idle(node)
        return node

    def _idle(self, node: Node) -> None:
        """Raise _Busy if long work is changing node (see _guarded)."""
        done = self.busy.get(node.ino)
        if done is not None:
            raise _Busy(done)

    async def _copied_up(self, node: Node, data: bool = True, log: CopyLog | None = None,
                         hold: list[int] | None = None) -> None:
        """Bring node into the upper (see copyup.CopyUp). A regular file's data and
        fsync, which take seconds for a big file, run in a worker thread while the
        handler is detached from the request loop: other requests go on being
        answered, those on node wait (_Busy) until the copy is in place. With
        `log`, what was copied is noted (to undo); with `hold`, node stays busy
        (its number is added) until the caller _release()s it."""
        if node.in_upper:
            return
        copyup = self._copyup()
        if node.is_dir or node.parent is None:
            copyup.node(node, data, log)
            return
        copyup.node(node.parent, log=log)
        copy = copyup.begin(node, data)
        busy = copy.long or hold is not None
        if busy:
            self.busy[node.ino] = trio.Event()
        try:
            if copy.long:
                await pyfuse3.detach()
                await trio.to_thread.run_sync(copy.fill)
            else:
                copy.fill()
            copyup.end(node, copy, log)
        finally:
            if busy and hold is not None:
                hold.append(node.ino)
            elif busy:
                self._release([node.ino])

    def _release(self, inos: list[int]) -> None:
        """Long work on these nodes is over: the requests waiting for them start over."""
        for ino in inos:
            self.busy.pop(ino).set()

    def _fh(self, handle: DirHandle | FileHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        handle.node.handles += 1
        return fh

    def _open_files(self, node: Node) -> list[FileHandle]:
        return [h for h in self.handles.values() if isinstance(h, FileHandle) and h.node is node]

    def _handle_fd(self, node: Node) -> int | None:
        """An fd of an open handle of node, or None."""
        files = self._open_files(node)
        return files[0].fd if files else None

    def _where(self, node: Node) -> tuple[int, str]:
        """The directory fd and name of a linked non-root node in its layer."""
        if node.unlinked or node.parent is None:
            raise stale()
        return self.table.dirfd(node.parent, node.layer), node.name

    def _stat(self, node: Node) -> os.stat_result:
        if node.is_dir and not node.unlinked:
            return os.fstat(self.table.dirfd(node, node.layer))
        if node.unlinked:
            fd = self._handle_fd(node)
            if fd is None:
                raise FUSEError(errno.ESTALE)
            return os.fstat(fd)
        dirfd, name = self._where(node)
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if ident(st) != node.ident:
            raise FUSEError(errno.ESTALE)
        return st

    def _attrs(self, node: Node, st: os.stat_result) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout
        a.st_mode = st.st_mode
        a.st_nlink = 1 if node.merged or (self.opts.static_nlink and node.is_dir) else st.st_nlink
        a.st_uid = self._uid_in(st.st_uid)
        a.st_gid = self._gid_in(st.st_gid)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def _uid_in(self, uid: int) -> int:
        if self.opts.squash_to_uid is not None:
            return self.opts.squash_to_uid
        return self.opts.uidmapping.to_inside(uid) if self.opts.uidmapping else uid

    def _gid_in(self, gid: int) -> int:
        if self.opts.squash_to_gid is not None:
            return self.opts.squash_to_gid
        return self.opts.gidmapping.to_inside(gid) if self.opts.gidmapping else gid

    def _uid_out(self, uid: int) -> int:
        return self.opts.uidmapping.to_outside(uid) if self.opts.uidmapping else uid

    def _gid_out(self, gid: int) -> int:
        return self.opts.gidmapping.to_outside(gid) if self.opts.gidmapping else gid

    def _copyup(self) -> CopyUp:
        if self.readonly or self.copyup is None:
            raise FUSEError(errno.EROFS)
        return self.copyup

    def _writable(self) -> WorkDir:
        return self._copyup().work

    def _moved(self, node: Node, upper_dir: int) -> None:
        """node's file now has its upper copy: its open handles move to it, so
        every reader sees what is written from now on."""
        for h in self._open_files(node):
            fd = os.open(node.name, (h.flags & ~(_NOT_BACKING | os.O_TRUNC)) | _BACKING, dir_fd=upper_dir)
            try:
                os.dup2(fd, h.fd, inheritable=False)
            finally:
                os.close(fd)

    def _resolve(self, parent: Node, name: str) -> Entry | None:
        # Nothing is in the upper below a directory that is not: this process
        # copies a directory up before it puts anything in it.
        return self.stack.child(self.table.view(parent), name)

    def _child(self, parent: Node, name: str) -> tuple[Entry, Node]:
        entry = self._resolve(parent, name)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        node = self.table.attach(parent, name, entry)
        if self.busy:
            try:
                self._idle(node)
            except _Busy:
                self.table.drop_unused(node)
                raise
        return entry, node

    def _in_lowers(self, parent: Node, name: str) -> bool:
        """Whether removing the upper's `name` would uncover something: then a
        whiteout must stay in its place."""
        return self.stack.child(self.table.view(parent, with_upper=False), name) is not None

    def _is_empty(self, node: Node) -> bool:
        return not self.stack.listing(self.table.view(node))

    # ---- new entries -----------------------------------------------------------------------

    def _owner(self, parent: Node, ctx: RequestContext) -> tuple[int, int, bool]:
        """uid and gid of a new entry, and whether the parent's setgid bit passes on."""
        pst = os.fstat(self.table.dirfd(parent, UPPER))
        setgid = bool(pst.st_mode & stat.S_ISGID)
        gid = pst.st_gid if setgid else self._gid_out(ctx.gid)
        return self._uid_out(ctx.uid), gid, setgid

    def _create_entry(self, parent: Node, name: str, ctx: RequestContext,
                      make: Callable[[int, str], None], mode: int | None) -> tuple[Entry, Node]:
        """Create a new name in the upper: in place, or, where a whiteout stands,
        built in the work dir and renamed over it."""
        work = self._writable()
        if self._resolve(parent, name) is not None:
            raise FUSEError(errno.EEXIST)
        self._copyup().node(parent)
        ufd = self.table.dirfd(parent, UPPER)
        uid, gid, setgid = self._owner(parent, ctx)
        try:
            over_whiteout = is_whiteout(os.stat(name, dir_fd=ufd, follow_symlinks=False))
        except FileNotFoundError:
            over_whiteout = False
        dirfd, tmp = (work.fd, work.temp()) if over_whiteout else (ufd, name)
        make(dirfd, tmp)
        try:
            made = os.stat(tmp, dir_fd=dirfd, follow_symlinks=False)
            is_dir = stat.S_ISDIR(made.st_mode)
            if (made.st_uid, made.st_gid) != (uid, gid):  # mostly they are already right
                os.chown(tmp, uid, gid, dir_fd=dirfd, follow_symlinks=False)
            if mode is not None:
                if setgid and is_dir:
                    mode |= stat.S_ISGID
                os.chmod(tmp, stat.S_IMODE(mode), dir_fd=dirfd)  # made just now: not a symlink
            if is_dir and (over_whiteout or parent.lowers):
                # As the kernel does: nothing below can show through a new directory.
                fd = open_dir(dirfd, tmp)
                try:
                    set_opaque(fd)
                finally:
                    os.close(fd)
            if over_whiteout:
                if is_dir:
                    # A directory cannot replace a whiteout: swap them, then drop the whiteout.
                    renameat2(work.fd, tmp, ufd, name, RENAME_EXCHANGE)
                    work.discard(tmp)
                else:
                    os.rename(tmp, name, src_dir_fd=work.fd, dst_dir_fd=ufd)
        except BaseException:
            if over_whiteout:
                work.discard(tmp)
            else:
                self._unmake(ufd, name)
            raise
        entry = Entry(UPPER, os.stat(name, dir_fd=ufd, follow_symlinks=False))
        return entry, self.table.attach(parent, name, entry)

    @staticmethod
    def _unmake(dirfd: int, name: str) -> None:
        """Take back a new entry whose set-up failed."""
        try:
            os.unlink(name, dir_fd=dirfd)
        except IsADirectoryError:
            os.rmdir(name, dir_fd=dirfd)

    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        parent = self._node(parent_inode)
        sname = os.fsdecode(name)
        if sname in (".", ".."):
            node = parent if sname == "." else (parent.parent or self.table.root)
            st = self._stat(node)
        else:
            entry = self._resolve(parent, sname)
            if entry is None:
                neg = EntryAttributes()
                neg.st_ino = 0
                neg.entry_timeout = self.timeout
                return neg
            node = self.table.attach(parent, sname, entry)
            st = entry.st  # just resolved: no second lstat
        attrs = self._attrs(node, st)
        self.table.lookup(node)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.table.forget(ino, n)

    async def getattr(self, inode: int, ctx: RequestContext | None = None) -> EntryAttributes:
        node = self._node(inode)
        return self._attrs(node, self._stat(node))

    async def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields,
                      fh: int | None, ctx: RequestContext) -> EntryAttributes:
        node = self._node(inode)
        await self._copied_up(node, data=not (fields.update_size and attr.st_size == 0))
        handle = self.handles.get(fh) if fh is not None else None
        fd = handle.fd if isinstance(handle, FileHandle) else None
        if fd is None:
            fd = self.table.dirfd(node, UPPER) if node.is_dir else self._handle_fd(node)
        dirfd, name = (-1, "") if fd is not None else self._where(node)
        if fd is None:
            self._stat(node)  # still the file looked up
        if fields.update_uid or fields.update_gid:
            uid = self._uid_out(attr.st_uid) if fields.update_uid else -1
            gid = self._gid_out(attr.st_gid) if fields.update_gid else -1
            if fd is not None:
                os.chown(fd, uid, gid)
            else:
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        if fields.update_mode and not stat.S_ISLNK(attr.st_mode):
            os.chmod(fd if fd is not None else at(dirfd, name), stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            self._truncate(node, fd, dirfd, name, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            st = self._stat(node)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            if fd is not None:
                os.utime(fd, ns=(atime, mtime))
            else:
                os.utime(name, ns=(atime, mtime), dir_fd=dirfd, follow_symlinks=False)
        return self._attrs(node, self._stat(node))

    def _truncate(self, node: Node, fd: int | None, dirfd: int, name: str, size: int) -> None:
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        if fd is not None:
            try:
                os.ftruncate(fd, size)
                return
            except OSError as e:
                if e.errno not in (errno.EBADF, errno.EINVAL):
                    raise
            # A handle opened for reading only: reopen the same file to write.
            wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
        else:
            wfd = open_checked(dirfd, name, os.O_WRONLY, node.ident)
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)

    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        dirfd, name = self._where(self._node(inode))
        return os.fsencode(os.readlink(name, dir_fd=dirfd))

    def _new(self, parent_inode: int, name: bytes, ctx: RequestContext,
             make: Callable[[int, str], None], mode: int | None) -> EntryAttributes:
        parent = self._node(parent_inode)
        entry, node = self._create_entry(parent, os.fsdecode(name), ctx, make, mode)
        self.table.lookup(node)
        return self._attrs(node, entry.st)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise FUSEError(errno.EPERM)  # a whiteout: never made through the mount (as the kernel)
        return self._new(parent_inode, name, ctx,
                         lambda d, n: os.mknod(n, mode, rdev, dir_fd=d), mode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._new(parent_inode, name, ctx, lambda d, n: os.mkdir(n, 0o700, dir_fd=d),
                         stat.S_IFDIR | mode)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: RequestContext) -> EntryAttributes:
        return self._new(parent_inode, name, ctx, lambda d, n: os.symlink(target, n, dir_fd=d), None)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: RequestContext) -> EntryAttributes:
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        name = os.fsdecode(new_name)
        work = self._writable()
        if node.is_dir:
            raise FUSEError(errno.EPERM)
        if node.unlinked:
            raise FUSEError(errno.ENOENT)
        await self._copied_up(node)
        if self._resolve(parent, name) is not None:
            raise FUSEError(errno.EEXIST)
        self._copyup().node(parent)
        src_dir, src = self._where(node)
        self._stat(node)  # still the file looked up
        ufd = self.table.dirfd(parent, UPPER)
        try:
            os.stat(name, dir_fd=ufd, follow_symlinks=False)
        except FileNotFoundError:
            os.link(src, name, src_dir_fd=src_dir, dst_dir_fd=ufd, follow_symlinks=False)
        else:  # a whiteout: link beside it, then replace it
            tmp = work.temp()
            os.link(src, tmp, src_dir_fd=src_dir, dst_dir_fd=work.fd, follow_symlinks=False)
            os.rename(tmp, name, src_dir_fd=work.fd, dst_dir_fd=ufd)
        self.table.add_alias(node, parent, name)
        self.table.lookup(node)
        return self._attrs(node, self._stat(node))

    # ---- removal and rename ------------------------------------------------------------

    def _remove(self, parent: Node, name: str, want_dir: bool) -> None:
        work = self._writable()
        entry, node = self._child(parent, name)
        if want_dir and not entry.is_dir:
            raise FUSEError(errno.ENOTDIR)
        if not want_dir and entry.is_dir:
            raise FUSEError(errno.EISDIR)
        if entry.is_dir and not self._is_empty(node):
            raise FUSEError(errno.ENOTEMPTY)
        self._copyup().node(parent)
        ufd = self.table.dirfd(parent, UPPER)
        below = self._in_lowers(parent, name)
        if entry.layer != UPPER:
            make_whiteout(ufd, name)
        elif below:
            tmp = work.temp()
            make_whiteout(work.fd, tmp)
            if entry.is_dir:
                renameat2(work.fd, tmp, ufd, name, RENAME_EXCHANGE)
                work.discard(tmp)
            else:
                os.rename(tmp, name, src_dir_fd=work.fd, dst_dir_fd=ufd)
        elif entry.is_dir:
            tmp = work.temp()
            os.rename(name, tmp, src_dir_fd=ufd, dst_dir_fd=work.fd)
            work.discard(tmp)
        else:
            os.unlink(name, dir_fd=ufd)
        if entry.layer == UPPER and (entry.is_dir or entry.st.st_nlink <= 1):
            self.table.forget_key(entry.st)
        self.table.removed(node, parent, name)
        self.table.drop_unused(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._remove(self._node(parent_inode), os.fsdecode(name), want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._remove(self._node(parent_inode), os.fsdecode(name), want_dir=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: RequestContext) -> None:
        old_parent, new_parent = self._node(parent_inode_old), self._node(parent_inode_new)
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        # What is to move is copied up first, file data off the request loop: a
        # lower file, or the files below a lower directory (see _files_copied_up),
        # which stay busy until the rename is done and are taken back if it fails.
        moving = [(old_parent, old)] + ([(new_parent, new)] if flags & pyfuse3.RENAME_EXCHANGE else [])
        log: CopyLog = []
        hold: list[int] = []
        try:
            for parent, name in moving:
                entry, node = self._child(parent, name)
                try:
                    if not entry.is_dir:
                        await self._copied_up(node)
                    elif entry.lowers and self.opts.redirect_dir:
                        await self._files_copied_up(node, log, hold)
                finally:
                    self.table.drop_unused(node)
            if flags & pyfuse3.RENAME_EXCHANGE:
                self._exchange(old_parent, old, new_parent, new)
            else:
                self._rename(old_parent, old, new_parent, new, flags)
        except BaseException:
            if log:
                self._copyup().undo(log)
            raise
        finally:
            self._release(hold)

    async def _files_copied_up(self, top: Node, log: CopyLog, hold: list[int]) -> None:
        """Copy up the lower files below a directory about to be renamed, one by one
        as a file's copy-up is (data in a worker thread), so that copyup.tree, which
        then brings the rest up on the loop, has only directories, links and empty
        files left to copy. Each copy is noted in log and held busy (hold): if the
        rename fails (ENOSPC), the caller takes them all back, and nobody can have
        written to them meanwhile."""
        walk = self._copyup().walk(top)
        try:
            for child, entry in walk:
                if not entry.is_dir and stat.S_ISREG(entry.st.st_mode) and entry.st.st_size:
                    self._idle(child)
                    await self._copied_up(child, log=log, hold=hold)
        finally:
            walk.close()

    @staticmethod
    def _inside(node: Node, d: Node) -> bool:
        """Whether node is d or below it."""
        n: Node | None = node
        while n is not None:
            if n is d:
                return True
            n = n.parent
        return False

    def _movable(self, node: Node, entry: Entry) -> None:
        """Bring what is to be renamed into the upper: a directory with lower
        content whole (as the kernel's redirect_dir=on allows it to move)."""
        if entry.is_dir and entry.lowers:
            self._copyup().tree(node)
        else:
            self._copyup().node(node)

    def _rename(self, old_parent: Node, old: str, new_parent: Node, new: str, flags: int) -> None:
        self._writable()
        src, src_node = self._child(old_parent, old)
        dst = self._resolve(new_parent, new)
        if dst is None:
            self._move(src, src_node, old_parent, old, new_parent, new, None)
            return
        if flags & pyfuse3.RENAME_NOREPLACE:
            raise FUSEError(errno.EEXIST)
        dst_node = self.table.attach(new_parent, new, dst)
        try:
            if dst_node is src_node:
                return  # two names of one file: rename(2) does nothing
            if src.is_dir and not dst.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FUSEError(errno.EISDIR)
            self._check_move(src, src_node, new_parent)
            if dst.is_dir and not self._is_empty(dst_node):
                raise FUSEError(errno.ENOTEMPTY)
            self._move(src, src_node, old_parent, old, new_parent, new, (dst, dst_node))
        finally:
            self.table.drop_unused(dst_node)

    def _check_move(self, src: Entry, src_node: Node, new_parent: Node) -> None:
        if src.is_dir and self._inside(new_parent, src_node):
            raise FUSEError(errno.EINVAL)
        if src.is_dir and src.lowers and not self.opts.redirect_dir:
            raise FUSEError(errno.EXDEV)  # the kernel's answer for a merged or lower dir

    def _move(self, src: Entry, src_node: Node, old_parent: Node, old: str, new_parent: Node, new: str,
              dst: tuple[Entry, Node] | None) -> None:
        work = self._writable()
        self._check_move(src, src_node, new_parent)
        self._copyup().node(old_parent)
        self._copyup().node(new_parent)
        self._movable(src_node, src)
        sfd, dfd = self.table.dirfd(old_parent, UPPER), self.table.dirfd(new_parent, UPPER)
        try:
            dst_upper: os.stat_result | None = os.stat(new, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            dst_upper = None
        if dst_upper is not None and (stat.S_ISDIR(dst_upper.st_mode) or src.is_dir):
            # An empty merged dir may still hold whiteouts, and a dir cannot
            # replace a whiteout: clear the way in the work dir.
            tmp = work.temp()
            os.rename(new, tmp, src_dir_fd=dfd, dst_dir_fd=work.fd)
            work.discard(tmp)
        if src.is_dir and (self._in_lowers(new_parent, new)
                           or (dst_upper is not None and is_whiteout(dst_upper))):
            set_opaque(self.table.dirfd(src_node, UPPER))
        if self._in_lowers(old_parent, old):
            renameat2(sfd, old, dfd, new, RENAME_WHITEOUT)
        else:
            os.rename(old, new, src_dir_fd=sfd, dst_dir_fd=dfd)
        if dst is not None:
            dst_entry, dst_node = dst
            if dst_entry.layer == UPPER and (dst_entry.is_dir or dst_entry.st.st_nlink <= 1):
                self.table.forget_key(dst_entry.st)
            self.table.removed(dst_node, new_parent, new)
        self.table.moved(src_node, old_parent, old, new_parent, new)
        if src.is_dir:
            src_node.lowers = ()

    def _exchange(self, a_parent: Node, a: str, b_parent: Node, b: str) -> None:
        """renameat2(RENAME_EXCHANGE): both names must exist; each takes the other's place."""
        self._writable()
        a_entry, a_node = self._child(a_parent, a)
        b_entry, b_node = self._child(b_parent, b)
        if a_node is b_node:
            return
        if (a_entry.is_dir and self._inside(b_parent, a_node)) or \
                (b_entry.is_dir and self._inside(a_parent, b_node)):
            raise FUSEError(errno.EINVAL)
        for entry in (a_entry, b_entry):
            if entry.is_dir and entry.lowers and not self.opts.redirect_dir:
                raise FUSEError(errno.EXDEV)  # the kernel's answer for a merged or lower dir
        self._copyup().node(a_parent)
        self._copyup().node(b_parent)
        self._movable(a_node, a_entry)
        self._movable(b_node, b_entry)
        afd, bfd = self.table.dirfd(a_parent, UPPER), self.table.dirfd(b_parent, UPPER)
        # Each directory lands where lower names may lie below: nothing may show through.
        for node, entry, parent, name in ((a_node, a_entry, b_parent, b), (b_node, b_entry, a_parent, a)):
            if entry.is_dir and self._in_lowers(parent, name):
                set_opaque(self.table.dirfd(node, UPPER))
        renameat2(afd, a, bfd, b, RENAME_EXCHANGE)
        self.table.moved(a_node, a_parent, a, b_parent, b)
        self.table.moved(b_node, b_parent, b, a_parent, a)
        for node, entry in ((a_node, a_entry), (b_node, b_entry)):
            if entry.is_dir:
                node.lowers = ()

    # ---- files ---------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        node = self._node(inode)
        copied = False
        if flags & WRITE_FLAGS and not node.in_upper:
            await self._copied_up(node, data=not flags & os.O_TRUNC)
            copied = True
        bflags = (flags & ~_NOT_BACKING) | _BACKING
        if node.unlinked:
            other = self._handle_fd(node)
            if other is None:
                raise FUSEError(errno.ESTALE)
            fd = os.open(f"/proc/self/fd/{other}", bflags & ~os.O_NOFOLLOW)
        else:
            dirfd, name = self._where(node)
            fd = open_checked(dirfd, name, bflags, node.ident)
        # After a copy-up the kernel's cached pages are the lower file's: drop them.
        return self._open_file(node, fd, flags, keep_cache=not copied)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        parent = self._node(parent_inode)
        opened: list[int] = []

        def make(dirfd: int, path: str) -> None:
            cflags = ((flags | os.O_CREAT | os.O_EXCL) & ~(os.O_TRUNC | os.O_DIRECT)) | _BACKING
            opened.append(os.open(path, cflags, 0o600, dir_fd=dirfd))

        try:
            entry, node = self._create_entry(parent, os.fsdecode(name), ctx, make, mode)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self.table.lookup(node)
        return self._open_file(node, opened[0], flags, keep_cache=True), self._attrs(node, entry.st)

    def _file(self, fh: int) -> FileHandle:
        h = self.handles.get(fh)
        if not isinstance(h, FileHandle):
            raise FUSEError(errno.EBADF)
        if self.busy:
            self._idle(h.node)
        return h

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Inline, even when the data must come from the disk. Reading data not in
        the page cache in a worker thread (preadv2 RWF_NOWAIT telling which) was
        measured: each such read then pays two thread wake-ups (~0.1 ms each on this
        VM), and the kernel's read-ahead of the lower file suffers from the reads
        overlapping: dd of a 256 MiB lower file, cold, 0.16 -> 0.32 s, tar of 2,000
        files of 2 KiB, cold, 0.36 -> 0.79 s (medians of 5, interleaved)."""
        return os.pread(self._file(fh).fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self._file(fh).fd, buf, off)

    # No flush handler: pyfuse3 answers ENOSYS, and the kernel then stops sending
    # FLUSH, one round trip less on every close(). Nothing here needs it.

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if isinstance(h, FileHandle):
            os.close(h.fd)
            self._closed_file(h.node)
        if h is not None:
            self.table.release_handle(h.node)

    async def _long(self, fds: Sequence[int], call: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call on fds (duplicated: a handle may be released
        meanwhile) in a worker thread, the handler detached from the request loop."""
        own = [os.dup(fd) for fd in fds]
        try:
            await pyfuse3.detach()
            return await trio.to_thread.run_sync(functools.partial(call, *own, *args))
        finally:
            for fd in own:
                os.close(fd)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.opts.fsync:
            await self._long([self._file(fh).fd], os.fdatasync if datasync else os.fsync)

    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        await self._long([self._file(fh).fd], fallocate, mode, offset, length)

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (the only ones the kernel asks for) on the backing
        file, so holes show through the mount; its position is not used (pread)."""
        return os.lseek(self._file(fh).fd, off, whence)

    async def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                              flags: int) -> int:
        """Copy between two open files of the mount in the kernel (a reflink where the
        filesystem shares extents). EXDEV (layers on different filesystems) makes
        the kernel fall back to copying through reads and writes, as before."""
        return int(await self._long([self._file(fh_in).fd, self._file(fh_out).fd], os.copy_file_range,
                                    length, off_in, off_out))

    # ---- directories ---------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: RequestContext) -> FileInfo:
        # Every change to a directory passes through the kernel, which drops its
        # cached listing then: it may keep the listing as long as it likes
        # (cache_readdir is our pyfuse3 patch, unionfs/pyfuse3.patch).
        fh = self._fh(DirHandle(self._node(inode)))
        return FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self.handles.get(fh)
        if not isinstance(h, DirHandle):
            raise FUSEError(errno.EBADF)
        node = h.node
        if h.names is None or start_id == 0:
            h.names = [".", "..", *self.stack.listing(self.table.view(node))]
        view = self.table.view(node)
        for i in range(start_id, len(h.names)):
            name = h.names[i]
            if name in (".", ".."):
                # The kernel takes no lookup reference for these two.
                dot = node if name == "." else (node.parent or self.table.root)
                if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                             self._attrs(dot, self._stat(dot)), i + 1):
                    return
                continue
            entry = self.stack.child(view, name)
            if entry is None:
                continue  # removed while listing: skipped, offsets of the rest stay
            child = self.table.attach(node, name, entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attrs(child, entry.st), i + 1):
                self.table.drop_unused(child)
                return
            self.table.lookup(child)

    async def releasedir(self, fh: int) -> None:
        await self.release(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        top = UPPER if self.stack.has_upper else 1
        sv = os.statvfs(self.stack.root_fd(top))
        d = StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                  "f_favail", "f_namemax"):
            setattr(d, f, getattr(sv, f))
        return d

    async def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        return True

    # ---- xattrs ----------------------------------------------------------------------------

    def _check_xattrs(self, name: bytes) -> str:
        if not self.opts.xattrs:
            raise FUSEError(errno.ENOTSUP)
        return os.fsdecode(name)

    def _xattr_target(self, node: Node) -> tuple[str | int, dict[str, bool]]:
        """Where node's xattrs are: an fd, or an anchored path never followed."""
        if node.is_dir and not node.unlinked:
            return self.table.dirfd(node, node.layer), {}
        if node.unlinked:
            fd = self._handle_fd(node)
            if fd is None:
                raise FUSEError(errno.ESTALE)
            return fd, {}
        dirfd, name = self._where(node)
        return at(dirfd, name), {"follow_symlinks": False}

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        sname = self._check_xattrs(name)
        if is_private_xattr(sname):
            raise FUSEError(pyfuse3.ENOATTR)
        target, kw = self._xattr_target(self._node(inode))
        return os.getxattr(target, sname, **kw)

    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        if not self.opts.xattrs:
            return []
        target, kw = self._xattr_target(self._node(inode))
        return [os.fsencode(n) for n in os.listxattr(target, **kw) if not is_private_xattr(n)]

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: RequestContext) -> None:
        sname = self._check_xattrs(name)
        if is_private_xattr(sname):
            raise FUSEError(errno.EPERM)
        node = self._node(inode)
        await self._copied_up(node)
        target, kw = self._xattr_target(node)
        os.setxattr(target, sname, value, **kw)

    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        sname = self._check_xattrs(name)
        if is_private_xattr(sname):
            raise FUSEError(errno.EPERM)
        node = self._node(inode)
        target, kw = self._xattr_target(node)
        os.getxattr(target, sname, **kw)  # ENODATA before any copy-up
        await self._copied_up(node)
        target, kw = self._xattr_target(node)
        os.removexattr(target, sname, **kw)

