"""Shared test helpers for the layer store: building tars by hand, snapshotting a tree
in every detail a layer carries, and kernel overlayfs mounts as the reference view."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import kernel
from common.tree import remove_path
from images.store import Store


class TarBuilder:
    """Write tar entries exactly as a hostile or unusual producer would."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _add(self, name: str, type_: bytes, data: bytes = b"", **kw: Any) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type = type_
        info.mode = kw.pop("mode", 0o755 if type_ == tarfile.DIRTYPE else 0o644)
        info.mtime = kw.pop("mtime", 1_600_000_000)
        info.size = len(data) if type_ == tarfile.REGTYPE else 0
        for k, v in kw.items():
            setattr(info, k, v)
        self.tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)
        return self

    def dir(self, name: str, **kw: Any) -> TarBuilder:
        return self._add(name, tarfile.DIRTYPE, **kw)

    def file(self, name: str, data: bytes = b"x", **kw: Any) -> TarBuilder:
        return self._add(name, tarfile.REGTYPE, data, **kw)

    def symlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        return self._add(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)

    def hardlink(self, name: str, target: str, **kw: Any) -> TarBuilder:
        return self._add(name, tarfile.LNKTYPE, linkname=target, **kw)

    def chardev(self, name: str, major: int, minor: int) -> TarBuilder:
        return self._add(name, tarfile.CHRTYPE, devmajor=major, devminor=minor)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


_PRIVATE = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a merged view shows, per path: type, mode, owner, mtime (seconds, as layer
    tars carry), size, content hash, link target, device, user xattrs, link count."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            xattrs = {}
            with contextlib.suppress(OSError):
                for x in os.listxattr(p, follow_symlinks=False):
                    if not x.startswith(_PRIVATE):
                        xattrs[x] = os.getxattr(p, x, follow_symlinks=False)
            out[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                int(st.st_mtime),
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                digest,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else "",
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                tuple(sorted(xattrs.items())),
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else 0,
            )
    return out


@contextlib.contextmanager
def overlay(
    mnt: Path, lowers: list[Path], upper: Path | None = None, work: Path | None = None, extra: str = ""
) -> Iterator[Path]:
    """A kernel overlayfs mount, the reference for what a stack of layers means."""
    mnt.mkdir(parents=True, exist_ok=True)
    if len(lowers) == 1 and upper is None:  # a read-only overlay needs two lowers
        empty = mnt.with_name(mnt.name + ".empty")
        empty.mkdir(exist_ok=True)
        lowers = [*lowers, empty]
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    if upper is not None and work is not None:
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        opts += f",upperdir={upper},workdir={work}"
    if extra:
        opts += "," + extra
    kernel.mount("overlay", mnt, "overlay", 0, opts)
    try:
        yield mnt
    finally:
        kernel.umount(mnt, kernel.MNT_DETACH)


def image_view(store: Store, image_id: str, mnt: Path) -> dict[str, tuple[Any, ...]]:
    """What an image shows, through a read-only kernel overlayfs of its layers."""
    with overlay(mnt, store.image(image_id).lowerdirs) as m:
        return snapshot(m)


# --- hostile trees and host users --------------------------------------------------------

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run argv as a host user with no rights of its own (nobody, no groups). Through a
    shell's exec: setpriv still holds root's capabilities at its own execve, so a path
    given straight to it is resolved with root's rights."""
    return subprocess.run([*NOBODY, "sh", "-c", 'exec "$@"', "sh", *argv],
                          capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A directory every host user can traverse (pytest's own tmp_path is 0700: a test
    that host users cannot reach a state root there would prove nothing)."""
    top = Path(tempfile.mkdtemp(prefix="strata-reachable-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        for target in sorted((t for _, t, _, _ in kernel.mounts() if t.startswith(f"{top}/")), reverse=True):
            kernel.umount(target, kernel.MNT_DETACH)
        remove_path(top)


def make_deep(top: Path, depth: int, leaf: bytes | None = None) -> None:
    """A chain of `depth` directories `d/d/...` below top, made through fds (its paths may
    outgrow PATH_MAX, as a container's can), with a file `f` at the bottom if leaf is given."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            fd, above = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
            os.close(above)
        if leaf is not None:
            out = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(out, leaf)
            os.close(out)
    finally:
        os.close(fd)


def depth_of(top: Path) -> int:
    """How many `d` directories are chained below top."""
    depth, fd = 0, os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                fd, above = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd), fd
            except FileNotFoundError:
                return depth
            os.close(above)
            depth += 1
    finally:
        os.close(fd)


def deep_tar(depth: int, *tail: tuple[str, bytes]) -> bytes:
    """A tar of one file `depth` directories down (its parents implied), then the tail
    entries (name, content)."""
    b = TarBuilder().file("/".join(["d"] * depth) + "/f", b"deep")
    for name, data in tail:
        b.file(name, data)
    return b.bytes()
