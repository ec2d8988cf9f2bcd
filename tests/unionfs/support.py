"""Mounting for the union filesystem tests: strata-unionfs, kernel overlayfs and
fuse-overlayfs over the same layers, always unmounted and their daemons gone
afterwards, and a tree snapshot to compare what each one shows."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common.errors import StrataError
from unionfs import client

STRATA = str(Path(sys.executable).with_name("strata-unionfs"))
# Bookkeeping the kernel writes into its upper that says nothing about the tree.
KERNEL_PRIVATE = ("trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.nlink",
                  "trusted.overlay.uuid")


def daemon_pids(mnt: Path) -> list[int]:
    """The processes serving a FUSE mount (found by their command line)."""
    pids = []
    target = str(mnt)
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"strata-unionfs" in a or b"fuse-overlayfs" in a for a in argv[:2]) and \
                any(_names(target, os.fsdecode(a)) for a in argv[1:]):
            with contextlib.suppress(OSError):
                if (p / "stat").read_text().split()[2] != "Z":
                    pids.append(int(p.name))
    return pids


def _names(target: str, arg: str) -> bool:
    """Whether a daemon's argument names target (relative ones were relative to its start dir)."""
    arg = arg.rstrip("/")
    if not arg or arg.startswith("-"):
        return False
    return arg == target if arg.startswith("/") else target.endswith("/" + arg)


def is_mounted(mnt: Path) -> bool:
    target = os.path.realpath(mnt)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def unmount(mnt: Path) -> None:
    """Unmount whatever is at mnt (unionfs.client's way) and wait for its daemon to go."""
    pids = daemon_pids(mnt)
    with contextlib.suppress(StrataError):
        client.unmount(mnt)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert not is_mounted(mnt), f"{mnt} still mounted"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def overlay_opts(lowers: list[Path], upper: Path | None, work: Path | None) -> str:
    return client.Union(lowers, upper, work).options()


@contextlib.contextmanager
def mounted(kind: str, lowers: list[Path], upper: Path | None, work: Path | None, mnt: Path,
            extra: str = "") -> Iterator[Path]:
    """Mount kind ('strata', 'kernel' or 'fuse-overlayfs') at mnt for the with-block."""
    mnt.mkdir(parents=True, exist_ok=True)
    union = client.Union(lowers, upper, work, [extra] if extra else [])
    if kind == "fuse-overlayfs":
        r = subprocess.run(["fuse-overlayfs", "-o", union.options(), str(mnt)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, f"{kind} mount failed: {r.stderr.strip()}"
    else:
        try:
            client.mount(union, mnt, client.STRATA if kind == "strata" else client.KERNEL)
        except StrataError as e:
            raise AssertionError(f"{kind} mount failed: {e}") from None
    try:
        yield mnt
    finally:
        unmount(mnt)


def layer_dirs(root: Path, n_lowers: int) -> tuple[list[Path], Path, Path, Path]:
    lowers = [root / f"l{i}" for i in range(n_lowers)]
    upper, work, mnt = root / "upper", root / "work", root / "mnt"
    for d in [*lowers, upper, work, mnt]:
        d.mkdir(parents=True, exist_ok=True)
    return lowers, upper, work, mnt


def snapshot(root: Path, upper_format: bool = False) -> dict[str, tuple[object, ...]]:
    """What a tree shows: type, mode, owner, size, content digest or link target
    or device number, and xattrs (in an upper, without the kernel's own
    bookkeeping). Directory sizes and times differ between filesystems and are
    left out."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISREG(m):
                with open(p, "rb") as f:
                    detail: object = (st.st_size, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(m):
                detail = os.readlink(p)
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                detail = None
            xattrs = {}
            for x in os.listxattr(p, follow_symlinks=False):
                if upper_format and x in KERNEL_PRIVATE:
                    continue
                xattrs[x] = os.getxattr(p, x, follow_symlinks=False)
            out[rel] = (stat.S_IFMT(m), stat.S_IMODE(m), st.st_uid, st.st_gid, detail,
                        tuple(sorted(xattrs.items())))
    return out
