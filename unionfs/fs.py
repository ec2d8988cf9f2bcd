"""The FUSE operations of strata-unionfs, over the layer stack, the inode table
and copy-up.

The daemon is the only writer of its upper and lower layers never change, so
the kernel is told to cache entries, attributes and pages for `timeout`
seconds (fuse-overlayfs's default: 10^9 s); every change passes through the
kernel, which updates its own caches as it goes.
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
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields, StatvfsData

from .copyup import WorkDir, copy_up
from .inodes import InodeTable, Node
from .kernel import RENAME_EXCHANGE, RENAME_WHITEOUT, rename2
from .layers import UPPER, Entry, LayerStack, join
from .options import MountOptions
from .whiteout import is_marker, is_private_xattr, is_whiteout, make_whiteout, set_opaque

log = logging.getLogger(__name__)

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def _guarded(cls: type[pyfuse3.Operations]) -> type[pyfuse3.Operations]:
    """Wrap every FUSE handler so that no exception can end the session loop:
    real-filesystem errors reach the caller as the same errno, and a bug costs
    one request (EIO, logged), not the whole mount."""
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and hasattr(pyfuse3.Operations, name):
            def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
                @functools.wraps(fn)
                async def handler(*args: Any) -> Any:
                    try:
                        return await fn(*args)
                    except FUSEError:
                        raise
                    except OSError as e:
                        raise FUSEError(e.errno or errno.EIO) from e
                    except Exception as e:
                        log.exception("internal error")
                        raise FUSEError(errno.EIO) from e
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
        self.table = InodeTable(self.stack.root_entry())
        self.handles: dict[int, DirHandle | FileHandle] = {}
        self._next_fh = 1
        self.timeout = opts.timeout

    # ---- helpers -------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.table.nodes.get(ino)
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _real(self, node: Node) -> str:
        return self.stack.real(node.layer, node.path)

    def _fh(self, handle: DirHandle | FileHandle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        handle.node.handles += 1
        return fh

    def _stat(self, node: Node) -> os.stat_result:
        if node.unlinked:
            for h in self.handles.values():
                if isinstance(h, FileHandle) and h.node is node:
                    return os.fstat(h.fd)
        return os.lstat(self._real(node))

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

    def _writable(self) -> WorkDir:
        if self.readonly or self.work is None:
            raise FUSEError(errno.EROFS)
        return self.work

    def _resolve(self, parent: Node, name: str) -> Entry | None:
        if is_marker(name):
            return None
        # Nothing is in the upper below a directory that is not: this process
        # copies a directory up before it puts anything in it.
        return self.stack.child(parent.path, parent.lowers, name, with_upper=parent.in_upper)

    def _child(self, parent: Node, name: str) -> tuple[Entry, Node]:
        entry = self._resolve(parent, name)
        if entry is None:
            raise FUSEError(errno.ENOENT)
        return entry, self.table.attach(join(parent.path, name), entry)

    # ---- copy-up ---------------------------------------------------------------------------

    def _upper_dir(self, rel: str) -> None:
        """Make the directory rel (visible in the merged view) exist in the upper, parents first."""
        work = self._writable()
        if rel and not os.path.isdir(self.stack.real(UPPER, rel)):
            self._upper_dir(os.path.dirname(rel))
            layer = self.stack.first_lower_dir(rel)
            if layer is None:
                raise FUSEError(errno.ENOENT)
            src = self.stack.real(layer, rel)
            lst = os.lstat(src)
            ust = copy_up(work, src, lst, self.stack.real(UPPER, rel), fsync=False)
            self.table.copied_up(lst, layer, rel, ust)
            node = self.table.by_path.get(rel)
            if node is not None:
                node.layer = UPPER

    def _copy_up(self, node: Node, data: bool = True) -> None:
        if node.in_upper:
            return
        work = self._writable()
        self._upper_dir(os.path.dirname(node.path))
        if node.is_dir:
            self._upper_dir(node.path)
            return
        src = self._real(node)
        lst = os.lstat(src)
        ust = copy_up(work, src, lst, self.stack.real(UPPER, node.path), data, self.opts.fsync)
        self.table.copied_up(lst, node.layer, node.path, ust)
        node.layer = UPPER

    def _copy_up_tree(self, rel: str, entry: Entry) -> None:
        """Bring a whole merged directory into the upper, so it can be renamed
        as one upper directory (marked opaque: nothing below shows through)."""
        node = self.table.attach(rel, entry)
        self._copy_up(node)
        for name in self.stack.listing(rel, True, entry.lowers):
            child = self.stack.child(rel, entry.lowers, name)
            if child is None:
                continue
            if child.is_dir:
                self._copy_up_tree(join(rel, name), child)
            elif child.layer != UPPER:
                self._copy_up(self.table.attach(join(rel, name), child))
        set_opaque(self.stack.real(UPPER, rel))
        node.lowers = ()
        prefix = rel + "/"
        for path, n in self.table.by_path.items():
            if path.startswith(prefix) and n.is_dir:
                n.lowers = ()

    # ---- new entries -----------------------------------------------------------------------

    def _owner(self, parent: Node, ctx: RequestContext) -> tuple[int, int, bool]:
        """uid and gid of a new entry, and whether the parent's setgid bit passes on."""
        pst = os.lstat(self._real(parent))
        setgid = bool(pst.st_mode & stat.S_ISGID)
        gid = pst.st_gid if setgid else self._gid_out(ctx.gid)
        return self._uid_out(ctx.uid), gid, setgid

    def _create_entry(self, parent: Node, name: str, ctx: RequestContext,
                      make: Callable[[str], None], mode: int | None) -> tuple[Entry, Node]:
        """Create a new name in the upper: in place, or, where a whiteout stands,
        built in the work dir and renamed over it."""
        work = self._writable()
        if self._resolve(parent, name) is not None:
            raise FUSEError(errno.EEXIST)
        self._copy_up(parent)
        rel = join(parent.path, name)
        target = self.stack.real(UPPER, rel)
        uid, gid, setgid = self._owner(parent, ctx)
        try:
            over_whiteout = is_whiteout(os.lstat(target))
        except FileNotFoundError:
            over_whiteout = False
        path = work.temp() if over_whiteout else target
        make(path)
        try:
            made = os.lstat(path)
            is_dir = stat.S_ISDIR(made.st_mode)
            if (made.st_uid, made.st_gid) != (uid, gid):  # mostly they are already right
                os.chown(path, uid, gid, follow_symlinks=False)
            if mode is not None:
                if setgid and is_dir:
                    mode |= stat.S_ISGID
                os.chmod(path, stat.S_IMODE(mode))
            if is_dir and (over_whiteout or parent.lowers):
                # As the kernel does: nothing below can show through a new directory.
                set_opaque(path)
            if over_whiteout:
                if is_dir:
                    # A directory cannot replace a whiteout: swap them, then drop the whiteout.
                    rename2(path, target, RENAME_EXCHANGE)
                    work.discard(path)
                else:
                    os.rename(path, target)
        except BaseException:
            work.discard(path)
            raise
        entry = Entry(UPPER, os.lstat(target))
        return entry, self.table.attach(rel, entry)

    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        parent = self._node(parent_inode)
        sname = os.fsdecode(name)
        if sname in (".", ".."):
            node = parent
            if sname == "..":
                node = self.table.by_path.get(os.path.dirname(parent.path), self.table.root)
            st = self._stat(node)
        else:
            entry = self._resolve(parent, sname)
            if entry is None:
                neg = EntryAttributes()
                neg.st_ino = 0
                neg.entry_timeout = self.timeout
                return neg
            node = self.table.attach(join(parent.path, sname), entry)
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
        self._copy_up(node, data=not (fields.update_size and attr.st_size == 0))
        path = self._real(node)
        handle = self.handles.get(fh) if fh is not None else None
        if fields.update_uid or fields.update_gid:
            uid = self._uid_out(attr.st_uid) if fields.update_uid else -1
            gid = self._gid_out(attr.st_gid) if fields.update_gid else -1
            os.chown(path, uid, gid, follow_symlinks=False)
        if fields.update_mode and not stat.S_ISLNK(attr.st_mode):
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            if isinstance(handle, FileHandle):
                os.ftruncate(handle.fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)
        return self._attrs(node, self._stat(node))

    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        node = self._node(inode)
        return os.fsencode(os.readlink(self._real(node)))

    def _new(self, parent_inode: int, name: bytes, ctx: RequestContext,
             make: Callable[[str], None], mode: int | None) -> EntryAttributes:
        parent = self._node(parent_inode)
        entry, node = self._create_entry(parent, os.fsdecode(name), ctx, make, mode)
        self.table.lookup(node)
        return self._attrs(node, entry.st)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._new(parent_inode, name, ctx, lambda p: os.mknod(p, mode, rdev), mode)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: RequestContext) -> EntryAttributes:
        return self._new(parent_inode, name, ctx, lambda p: os.mkdir(p, 0o700), stat.S_IFDIR | mode)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: RequestContext) -> EntryAttributes:
        return self._new(parent_inode, name, ctx, lambda p: os.symlink(target, p), None)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: RequestContext) -> EntryAttributes:
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        name = os.fsdecode(new_name)
        work = self._writable()
        if node.is_dir:
            raise FUSEError(errno.EPERM)
        if self._resolve(parent, name) is not None:
            raise FUSEError(errno.EEXIST)
        self._copy_up(node)
        self._copy_up(parent)
        rel = join(parent.path, name)
        target = self.stack.real(UPPER, rel)
        if os.path.lexists(target):  # a whiteout: link beside it, then replace it
            tmp = work.temp()
            os.link(self._real(node), tmp)
            os.rename(tmp, target)
        else:
            os.link(self._real(node), target)
        node.aliases.add(rel)
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
        if entry.is_dir and self.stack.listing(node.path, entry.layer == UPPER, entry.lowers):
            raise FUSEError(errno.ENOTEMPTY)
        self._copy_up(parent)
        rel = join(parent.path, name)
        target = self.stack.real(UPPER, rel)
        below = self.stack.in_lowers(parent.path, parent.lowers, name)
        if entry.layer != UPPER:
            make_whiteout(target)
        elif below:
            tmp = work.temp()
            make_whiteout(tmp)
            if entry.is_dir:
                rename2(tmp, target, RENAME_EXCHANGE)
                work.discard(tmp)
            else:
                os.rename(tmp, target)
        elif entry.is_dir:
            tmp = work.temp()
            os.rename(target, tmp)
            work.discard(tmp)
        else:
            os.unlink(target)
        if entry.layer == UPPER and (entry.is_dir or entry.st.st_nlink <= 1):
            self.table.forget_key(entry.st)
        self.table.removed(rel)

    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._remove(self._node(parent_inode), os.fsdecode(name), want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._remove(self._node(parent_inode), os.fsdecode(name), want_dir=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: RequestContext) -> None:
        old_parent, new_parent = self._node(parent_inode_old), self._node(parent_inode_new)
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        self._rename(old_parent, old, new_parent, new, flags)

    def _rename(self, old_parent: Node, old: str, new_parent: Node, new: str, flags: int) -> None:
        work = self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)
        src, src_node = self._child(old_parent, old)
        dst = self._resolve(new_parent, new)
        if is_marker(new):
            raise FUSEError(errno.EINVAL)
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if self.table.ino_for(dst.st, dst.layer, join(new_parent.path, new)) == src_node.ino:
                return  # two names of one file: rename(2) does nothing
            if src.is_dir and not dst.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FUSEError(errno.EISDIR)
        old_rel, new_rel = join(old_parent.path, old), join(new_parent.path, new)
        if src.is_dir and new_rel.startswith(old_rel + "/"):
            raise FUSEError(errno.EINVAL)
        if src.is_dir and src.lowers and not self.opts.redirect_dir:
            raise FUSEError(errno.EXDEV)  # the kernel's answer for a merged or lower dir
        if dst is not None and dst.is_dir and self.stack.listing(new_rel, dst.layer == UPPER, dst.lowers):
            raise FUSEError(errno.ENOTEMPTY)
        self._copy_up(old_parent)
        self._copy_up(new_parent)
        if src.is_dir and src.lowers:
            self._copy_up_tree(old_rel, src)
        else:
            self._copy_up(src_node)
        src_path, dst_path = self.stack.real(UPPER, old_rel), self.stack.real(UPPER, new_rel)
        try:
            dst_upper: os.stat_result | None = os.lstat(dst_path)
        except FileNotFoundError:
            dst_upper = None
        if dst_upper is not None and (stat.S_ISDIR(dst_upper.st_mode) or src.is_dir):
            # An empty merged dir may still hold whiteouts, and a dir cannot
            # replace a whiteout: clear the way in the work dir.
            tmp = work.temp()
            os.rename(dst_path, tmp)
            work.discard(tmp)
        if (src.is_dir and self.stack.in_lowers(new_parent.path, new_parent.lowers, new)) or (
            src.is_dir and dst_upper is not None and is_whiteout(dst_upper)
        ):
            set_opaque(src_path)
        if self.stack.in_lowers(old_parent.path, old_parent.lowers, old):
            rename2(src_path, dst_path, RENAME_WHITEOUT)
        else:
            os.rename(src_path, dst_path)
        if dst is not None and dst.layer == UPPER and (dst.is_dir or dst.st.st_nlink <= 1):
            self.table.forget_key(dst.st)
        self.table.renamed(old_rel, new_rel)
        if src.is_dir:
            src_node.lowers = ()

    # ---- files ---------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            self._copy_up(node, data=not flags & os.O_TRUNC)
        fd = os.open(self._real(node), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))
        return FileInfo(fh=self._fh(FileHandle(node, fd)), keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        parent = self._node(parent_inode)
        opened: list[int] = []

        def make(path: str) -> None:
            opened.append(os.open(path, (flags | os.O_CREAT | os.O_EXCL) & ~os.O_TRUNC, 0o600))

        try:
            entry, node = self._create_entry(parent, os.fsdecode(name), ctx, make, mode)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self.table.lookup(node)
        fh = self._fh(FileHandle(node, opened[0]))
        return FileInfo(fh=fh, keep_cache=True), self._attrs(node, entry.st)

    def _file(self, fh: int) -> FileHandle:
        h = self.handles.get(fh)
        if not isinstance(h, FileHandle):
            raise FUSEError(errno.EBADF)
        return h

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._file(fh).fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self._file(fh).fd, buf, off)

    # No flush handler: pyfuse3 answers ENOSYS, and the kernel then stops sending
    # FLUSH, one round trip less on every close(). Nothing here needs it.

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if isinstance(h, FileHandle):
            os.close(h.fd)
        if h is not None:
            self.table.release_handle(h.node)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.opts.fsync:
            return
        fd = self._file(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

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
            h.names = self.stack.listing(node.path, node.in_upper, node.lowers)
        for i in range(start_id, len(h.names)):
            name = h.names[i]
            entry = self._resolve(node, name)
            if entry is None:
                continue  # removed while listing: skipped, offsets of the rest stay
            child = self.table.attach(join(node.path, name), entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attrs(child, entry.st), i + 1):
                return
            self.table.lookup(child)

    async def releasedir(self, fh: int) -> None:
        await self.release(fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        top = UPPER if self.stack.has_upper else 1
        sv = os.statvfs(self.stack.real(top, ""))
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

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        sname = self._check_xattrs(name)
        if is_private_xattr(sname):
            raise FUSEError(pyfuse3.ENOATTR)
        node = self._node(inode)
        return os.getxattr(self._real(node), sname, follow_symlinks=False)

    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        if not self.opts.xattrs:
            return []
        node = self._node(inode)
        names = os.listxattr(self._real(node), follow_symlinks=False)
        return [os.fsencode(n) for n in names if not is_private_xattr(n)]

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: RequestContext) -> None:
        sname = self._check_xattrs(name)
        if is_private_xattr(sname):
            raise FUSEError(errno.EPERM)
        node = self._node(inode)
        self._copy_up(node)
        os.setxattr(self._real(node), sname, value, follow_symlinks=False)

    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        sname = self._check_xattrs(name)
        if is_private_xattr(sname):
            raise FUSEError(errno.EPERM)
        node = self._node(inode)
        os.getxattr(self._real(node), sname, follow_symlinks=False)  # ENODATA before any copy-up
        self._copy_up(node)
        os.removexattr(self._real(node), sname, follow_symlinks=False)

