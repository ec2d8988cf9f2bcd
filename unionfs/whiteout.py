"""Whiteout and opaque markers: every form is read, one form is written.

Lower layers come from many writers: the kernel's overlayfs (char device 0/0,
`trusted.overlay.opaque`), rootless overlayfs (`user.overlay.opaque`),
fuse-overlayfs (`user.fuseoverlayfs.opaque`), and containers-storage / AUFS
image layers (`.wh.NAME` files, `.wh..wh..opq`). The upper is written only in
the kernel's form, so the kernel can mount it and show the same tree (the
kernel shows a `.wh..wh..opq` file as a plain file, so that form is not
written).
"""

from __future__ import annotations

import os
import stat

WH_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_XATTRS = (OPAQUE_XATTR, "user.overlay.opaque", "user.fuseoverlayfs.opaque")
# xattrs of the overlay machinery itself: never shown through the mount, never copied up.
PRIVATE_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_marker(name: str) -> bool:
    """A `.wh.`-prefixed name is overlay bookkeeping, never a visible entry."""
    return name.startswith(WH_PREFIX)


def whited_out_name(marker: str) -> str | None:
    """`.wh.NAME` -> NAME; None for the opaque marker (it hides no single name)."""
    if marker == OPAQUE_MARKER:
        return None
    return marker[len(WH_PREFIX):]


def whiteout_marker(name: str) -> str:
    """NAME -> `.wh.NAME`, the OCI whiteout file that hides NAME (whited_out_name's inverse)."""
    return WH_PREFIX + name


def has_opaque_xattr(target: str | int) -> bool:
    """Whether a directory (an fd, or a path that is never followed) is marked opaque."""
    for name in OPAQUE_XATTRS:
        try:
            value = (os.getxattr(target, name) if isinstance(target, int)
                     else os.getxattr(target, name, follow_symlinks=False))
            if value == b"y":
                return True
        except OSError:
            continue
    return False


def is_private_xattr(name: str) -> bool:
    return name.startswith(PRIVATE_XATTR_PREFIXES)


def make_whiteout(dirfd: int, name: str) -> None:
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dirfd)


def set_opaque(fd: int) -> None:
    """Mark the directory open at `fd` opaque."""
    os.setxattr(fd, OPAQUE_XATTR, b"y")
