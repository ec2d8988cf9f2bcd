"""Turning a mounted image into a container's root, inside the container's new mount
namespace: volumes and the per-container files bound in, a fresh /proc, a minimal
/dev (plus the devices given with --device), a read-only /sys, then pivot_root so the
host's tree is gone, and Docker's masked and read-only paths over /proc and /sys
(none of which a --privileged container gets).

Every path inside the rootfs is resolved as the container would see it (symlinks
are followed relative to the rootfs, never out of it): an image is untrusted input."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from common.errors import StrataError
from common.kernel import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    mount,
    umount,
)
from runtime.devices import STANDARD, Device
from runtime.namespaces import pivot_root

# Mount points the runtime owns: an image may not make them symlinks.
SYSTEM_DIRS = ("proc", "sys", "dev")
# Docker's (moby oci/defaults.go): masked -- a file gets /dev/null bound over it, a
# directory an empty read-only tmpfs -- and read-only.
MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class Bind:
    """A host path bound at `target` (absolute, as the container sees it)."""

    source: str
    target: str
    readonly: bool = False


def secure_join(root: str, path: str) -> str:
    """root + path with every symlink resolved as if root were `/`: the result is always
    inside root. Missing components are kept as they are."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise StrataError(f"too many levels of symbolic links in {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _make_target(root: str, target: str, is_dir: bool) -> str:
    """The path for a mount inside root, created (parents included) when missing."""
    path = secure_join(root, target)
    parent = os.path.dirname(path)
    # Create parents one by one through secure_join, so a symlink met on the way stays inside.
    if not os.path.isdir(parent):
        rel = os.path.relpath(parent, root)
        cur = "/"
        for part in rel.split("/"):
            cur = os.path.join(cur, part)
            p = secure_join(root, cur)
            if not os.path.isdir(p):
                os.mkdir(p, 0o755)
        path = secure_join(root, target)
    if not os.path.lexists(path):
        if is_dir:
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
    return path


def bind(root: str, b: Bind) -> None:
    dest = _make_target(root, b.target, os.path.isdir(b.source))
    mount(b.source, dest, None, MS_BIND | MS_REC)
    if b.readonly:
        mount(None, dest, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)


def _system_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    if os.path.islink(path):
        raise StrataError(f"the image's /{name} is a symlink; refusing to mount over it")
    if not os.path.exists(path):
        os.mkdir(path, 0o755)
    return path


def _make_device(root: str, dev: Device) -> None:
    """The node itself (as docker makes it: the host's mode and owner), not a bind of the
    host's, so nothing of the host's /dev is reachable through it."""
    path = _make_target(root, dev.path, False)
    if os.path.ismount(path):  # one of the standard nodes, bound from the host's
        umount(path, MNT_DETACH)
    os.unlink(path)
    kind = stat.S_IFCHR if dev.kind == "c" else stat.S_IFBLK
    os.mknod(path, kind | dev.mode, os.makedev(dev.major, dev.minor))
    os.chown(path, dev.uid, dev.gid, follow_symlinks=False)


def _mount_dev(root: str, console: str | None) -> None:
    dev = _system_dir(root, "dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name in STANDARD:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/dev/{name}", node, None, MS_BIND)
    for name in ("pts", "shm"):
        os.mkdir(os.path.join(dev, name), 0o755)
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
          "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", os.path.join(dev, name))
    os.symlink("/proc/self/fd", os.path.join(dev, "fd"))
    if console:
        node = os.path.join(dev, "console")
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o600))
        mount(console, node, None, MS_BIND)


def _mount_sys(root: str, privileged: bool) -> None:
    sys_dir = _system_dir(root, "sys")
    flags = (0 if privileged else MS_RDONLY) | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("sysfs", sys_dir, "sysfs", flags)
    except OSError:  # sysfs of a network namespace we do not own (--network host/container:)
        mount("/sys", sys_dir, None, MS_BIND | MS_REC)
        mount(None, sys_dir, None, MS_BIND | MS_REMOUNT | flags)


def _mask(path: str) -> None:
    try:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        else:
            mount("/dev/null", path, None, MS_BIND)
    except FileNotFoundError:  # not on this kernel
        pass


def _read_only(path: str) -> None:
    try:
        mount(path, path, None, MS_BIND | MS_REC)
    except FileNotFoundError:
        return
    mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def enter(rootfs: str, binds: list[Bind], console: str | None = None, devices: tuple[Device, ...] = (),
          privileged: bool = False) -> None:
    """Build the container's tree on rootfs and make it `/` (call in a new mount and PID
    namespace, as the container's PID 1, before dropping privileges)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(rootfs, rootfs, None, MS_BIND | MS_REC)
    proc = _system_dir(rootfs, "proc")
    mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount_dev(rootfs, console)
    for dev in devices:
        _make_device(rootfs, dev)
    _mount_sys(rootfs, privileged)
    for b in binds:
        bind(rootfs, b)
    os.chdir(rootfs)
    pivot_root(".", ".")
    umount(".", MNT_DETACH)
    os.chdir("/")
    if not privileged:
        for path in MASKED_PATHS:
            _mask(path)
        for path in READONLY_PATHS:
            _read_only(path)
