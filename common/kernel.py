"""Kernel interfaces Python 3.11's os module lacks, through ctypes on libc:
mount(2), umount2(2) and the mount-table query the packages above share."""

from __future__ import annotations

import ctypes
import os

# The interpreter's own libc (dlopen(NULL)): ctypes.util.find_library would run
# ldconfig, which costs a mount program milliseconds at every start.
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

MNT_FORCE = 1
MNT_DETACH = 2


def _b(s: str | os.PathLike[str] | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2); raises OSError naming the target."""
    if libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or ''} on {target}: {os.strerror(err)}")


def umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2); raises OSError naming the target."""
    if libc.umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[tuple[str, str, str, str]]:
    """(source, target, fstype, options) of every mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        lines = f.read().splitlines()
    for line in lines:
        src, tgt, fstype, opts = line.split()[:4]
        out.append((_unescape(src), _unescape(tgt), fstype, opts))
    return out


def mount_device(path: str | os.PathLike[str]) -> str | None:
    """"MAJOR:MINOR" of the file system mounted last at path, from /proc/self/mountinfo.
    Nothing touches path itself (not even realpath's lstat): a FUSE mount answers
    only once its daemon serves, and the caller may be that daemon."""
    path = os.path.abspath(path)
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                found = fields[2]
    return found


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True when something is mounted exactly at path (works for dead FUSE mounts too)."""
    target = os.path.realpath(path)
    return any(t == target for _, t, _, _ in mounts())


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src_dirfd: int, src: str, dst_dirfd: int, dst: str, flags: int) -> None:
    """renameat2(2), anchored at two directory fds: RENAME_WHITEOUT leaves an
    overlay whiteout where src was in the same atomic step (how the kernel's
    overlayfs removes lower names), RENAME_EXCHANGE swaps two names."""
    if libc.renameat2(src_dirfd, _b(src), dst_dirfd, _b(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (keep size, punch hole, zero range...),
    which os.posix_fallocate does not take."""
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
CLONE_NEWNS = 0x00020000


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2), which os has only from Python 3.12: join the namespace fd refers to."""
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def boot_id() -> str:
    """The kernel's random id of this boot ("" if unreadable): state recorded under another
    boot id (mount references, live mounts) did not survive the reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
