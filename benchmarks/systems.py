"""The filesystems under test, side by side: how each one mounts a layer
stack, what it reports as its version, and the set-up step that installs the
peers from Debian when they are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from common.errors import StrataError
from unionfs import client

from .dataset import Stack


class System:
    """A way to present a Stack at a mountpoint. Subclasses give the mount command."""

    key = ""
    title = ""
    union = True  # False: the plain directory, nothing is mounted
    daemon = True  # a FUSE daemon serves the mount (its RSS and CPU are measured)
    package: str | None = None  # the Debian package providing the program

    def program(self) -> str | None:
        return shutil.which(self.key)

    def mount_command(self, stack: Stack, upper: Path | None, work: Path | None, mnt: Path) -> list[str]:
        raise NotImplementedError

    def version(self) -> str:
        """The program's own `--version` line (peers also print their libfuse's; skip those)."""
        prog = self.program()
        if prog is None:
            return ""
        try:
            out = subprocess.run([prog, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        lines = (out.stdout + "\n" + out.stderr).splitlines()
        return next((ln.strip() for ln in lines if ln.startswith(self.key) and "version" in ln), "")

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None."""
        if self.program() is None:
            return f"{self.key} not found" + (f" (Debian package {self.package})" if self.package else "")
        return None


def _overlay_opts(stack: Stack, upper: Path | None, work: Path | None) -> str:
    return client.Union(stack.lowers, upper, work).options()


class StrataUnionfs(System):
    key = "strata-unionfs"
    title = "strata-unionfs"

    def program(self) -> str | None:
        try:
            return client.program()
        except StrataError:
            return None

    def mount_command(self, stack: Stack, upper: Path | None, work: Path | None, mnt: Path) -> list[str]:
        return [self.program() or "strata-unionfs", "-o", _overlay_opts(stack, upper, work), str(mnt)]


class StrataBaseline(StrataUnionfs):
    """Another build of strata-unionfs (STRATA_BASELINE=its program, e.g. the one in
    a checkout of an older commit), measured in the same run, interleaved with this
    one: before/after columns on equal terms."""

    key = "strata-baseline"
    title = "strata-unionfs (baseline)"

    def program(self) -> str | None:
        prog = os.environ.get("STRATA_BASELINE")
        return prog if prog and os.access(prog, os.X_OK) else None

    def version(self) -> str:
        return f"{os.environ.get('STRATA_BASELINE', '')}"

    def unavailable(self) -> str | None:
        if self.program() is None:
            return "set STRATA_BASELINE to the strata-unionfs program to compare with"
        return None


class KernelOverlayfs(System):
    key = "overlayfs"
    title = "kernel overlayfs"
    daemon = False

    def program(self) -> str | None:
        return shutil.which("mount")

    def version(self) -> str:
        return f"Linux {os.uname().release}"

    def unavailable(self) -> str | None:
        if "\toverlay\n" not in Path("/proc/filesystems").read_text():
            subprocess.run(["modprobe", "overlay"], capture_output=True)
            if "\toverlay\n" not in Path("/proc/filesystems").read_text():
                return "the kernel has no overlay filesystem"
        return None

    def mount_command(self, stack: Stack, upper: Path | None, work: Path | None, mnt: Path) -> list[str]:
        return ["mount", "-t", "overlay", "overlay", "-o", _overlay_opts(stack, upper, work), str(mnt)]


class FuseOverlayfs(System):
    key = "fuse-overlayfs"
    title = "fuse-overlayfs"
    package = "fuse-overlayfs"

    def mount_command(self, stack: Stack, upper: Path | None, work: Path | None, mnt: Path) -> list[str]:
        return ["fuse-overlayfs", "-o", _overlay_opts(stack, upper, work), str(mnt)]


class UnionfsFuse(System):
    key = "unionfs-fuse"
    title = "unionfs-fuse"
    package = "unionfs-fuse"

    def mount_command(self, stack: Stack, upper: Path | None, work: Path | None, mnt: Path) -> list[str]:
        # cow: writes to lower files copy them up (the union semantics the others have).
        branches = ":".join([*([f"{upper}=RW"] if upper else []), *(f"{lower}=RO" for lower in stack.lowers)])
        return ["unionfs-fuse", "-o", "cow", branches, str(mnt)]


class PlainDirectory(System):
    key = "plain"
    title = "plain directory"
    union = False
    daemon = False

    def program(self) -> str | None:
        return "plain"

    def version(self) -> str:
        return ""


ALL: tuple[System, ...] = (
    StrataUnionfs(),
    StrataBaseline(),
    KernelOverlayfs(),
    FuseOverlayfs(),
    UnionfsFuse(),
    PlainDirectory(),
)
BY_KEY = {s.key: s for s in ALL}
TOOLS = {"fio": "fio", "fusermount3": "fuse3"}  # programs the workloads need -> Debian package


def set_up(systems: Sequence[System], log: Callable[[str], None]) -> dict[str, str]:
    """Install missing peers and tools with apt-get; return {system key: why it cannot run}."""
    missing = sorted(
        {s.package for s in systems if s.package and s.program() is None}
        | {pkg for prog, pkg in TOOLS.items() if shutil.which(prog) is None}
    )
    if missing:
        log(f"installing Debian packages: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                log(f"{' '.join(cmd[:2])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                break
    return {s.key: why for s in systems if (why := s.unavailable()) is not None}
