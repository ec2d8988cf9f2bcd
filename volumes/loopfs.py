"""A filesystem image mounted through a loop device: how a `local` volume gets a
hard size limit on a host filesystem without project quotas. The image is a
sparse file holding ext4 (with its journal, so a crash never tears it).

Only what ext4 really uses is ever written: mkfs leaves the inode tables and the
journal unwritten (lazy_itable_init, lazy_journal_init) and discards nothing, and
every mount passes noinit_itable so the kernel never zeroes the inode tables in
the background either (ext4 knows which inodes were never used). A 1 TiB image
costs 16 MiB of disk at Create, not the 1 GiB journal plus, over the hours the
volume stays mounted, 16 GiB of zeroed inode tables."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from common import kernel
from common.errors import StrataError

MIN_SIZE = 8 << 20  # below this ext4's own metadata leaves too little room


def _run(argv: list[str], what: str) -> None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise StrataError(f"{what}: {e}") from None
    if res.returncode != 0:
        reason = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise StrataError(f"{what}: {reason}")


def check_tools() -> None:
    if not shutil.which("mkfs.ext4"):
        raise StrataError("size= on a local volume needs mkfs.ext4 (Debian package e2fsprogs)")


def make_image(image: Path, size: int, root: Path, uid: int, gid: int, mode: int) -> None:
    """Create image (size bytes, sparse) with an empty ext4 whose root directory has the
    given owner and mode, mounting it once at root to set them and drop lost+found (Docker
    copies image content only into an empty volume)."""
    with open(image, "wb") as f:
        f.truncate(size)
    extended = f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1,nodiscard"
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", extended, str(image)],
         f"cannot make a filesystem in {image}")
    mount_image(image, root)
    try:
        os.rmdir(root / "lost+found")
        os.chmod(root, mode)
    finally:
        kernel.umount(root)


def mount_image(image: Path, mountpoint: Path) -> None:
    _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noinit_itable", str(image), str(mountpoint)],
         f"cannot mount {image}")
