"""The `-o` option string of strata-unionfs, as podman, mount.fuse3 and
containerd write it.

The string is fuse-overlayfs's: layer options, fuse-overlayfs's own tuning
options and generic mount options mixed, with empty items allowed (podman
writes `,,volatile` and trailing commas). Every option fuse-overlayfs accepts
is accepted here; what each does is in the table in README.md. Anything else is
an error, so a typo never silently gives a different filesystem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import StrataError


@dataclass(frozen=True)
class IdMapping:
    """uidmapping=/gidmapping=: `inside:outside:count` ranges, colon separated
    triples joined by `:` (fuse-overlayfs's format), e.g. `0:1000:1:1:100000:65536`."""

    ranges: tuple[tuple[int, int, int], ...]

    def to_inside(self, outside: int) -> int:
        for inside, out, count in self.ranges:
            if out <= outside < out + count:
                return inside + outside - out
        return 65534  # the overflow id, as the kernel shows unmapped ids

    def to_outside(self, inside: int) -> int:
        for ins, out, count in self.ranges:
            if ins <= inside < ins + count:
                return out + inside - ins
        raise StrataError(f"id {inside} is not mapped")

    @classmethod
    def parse(cls, key: str, text: str) -> IdMapping:
        try:
            nums = [int(x) for x in text.split(":")]
        except ValueError:
            raise StrataError(f"{key}={text}: expected inside:outside:count triples") from None
        if not nums or len(nums) % 3 or any(n < 0 for n in nums):
            raise StrataError(f"{key}={text}: expected inside:outside:count triples")
        return cls(tuple((nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)))


# Generic mount options: passed to the kernel mount (they are meaningful there).
_KERNEL_FLAGS = {"ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                 "relatime", "norelatime", "strictatime", "nodiratime", "diratime", "sync", "async",
                 "dirsync", "lazytime", "nolazytime", "mand", "nomand", "silent", "loud"}
# Accepted for compatibility; the README says why each needs nothing from us.
_ACCEPTED_FLAGS = {"allow_other", "allow_root", "default_permissions", "noacl", "acl", "userxattr",
                   "auto_unmount", "nonempty", "defaults", "auto", "noauto", "user", "nouser", "users",
                   "_netdev", "nofail", "x-systemd.automount"}
_ACCEPTED_VALUES = {"threaded", "xino", "index", "metacopy", "nfs_export", "context",
                    "fscontext", "defcontext", "rootcontext", "max_read", "blksize", "plugins",
                    "max_idle_threads", "fsname", "subtype", "uid", "gid", "rootmode", "user_id",
                    "group_id", "x-systemd.requires", "x-systemd.after", "comment", "uuid", "volkey"}


@dataclass
class MountOptions:
    lowerdirs: list[str] = field(default_factory=list)
    upperdir: str | None = None
    workdir: str | None = None
    readonly: bool = False
    volatile: bool = False
    fsync: bool = True
    timeout: float = 1_000_000_000.0
    # Microseconds to poll for the next request after each reply before sleeping:
    # a client that asks again within that time is served without a wake-up.
    spin_us: int = 100
    squash_to_uid: int | None = None
    squash_to_gid: int | None = None
    uidmapping: IdMapping | None = None
    gidmapping: IdMapping | None = None
    static_nlink: bool = False
    xattrs: bool = True
    # Kernel overlayfs's redirect_dir=on: a directory from a lower layer can be renamed.
    # Any other value answers EXDEV there, as the kernel does without redirects.
    redirect_dir: bool = True
    fsname: str = "strata-unionfs"
    kernel_flags: list[str] = field(default_factory=list)


def _split_lowerdir(value: str) -> list[str]:
    r"""Split `A:B:C`; a colon inside a name is written `\:` (the kernel's escape)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            cur += value[i + 1]
            i += 2
            continue
        if c == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    if any(p == "" for p in parts):
        raise StrataError(f"lowerdir={value}: empty layer path")
    return parts


def _bool_value(key: str, value: str) -> bool:
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise StrataError(f"{key}={value}: expected 0 or 1")


def _int_value(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise StrataError(f"{key}={value}: expected a number") from None
    if n < 0:
        raise StrataError(f"{key}={value}: expected a number >= 0")
    return n


def parse(option_strings: list[str]) -> MountOptions:
    """Merge every `-o` string given (they accumulate, as with mount(8))."""
    opts = MountOptions()
    for text in option_strings:
        for item in text.split(","):
            if item:
                _apply(opts, item)
    if not opts.lowerdirs:
        raise StrataError("no lowerdir= given")
    if (opts.upperdir is None) != (opts.workdir is None):
        raise StrataError("upperdir= and workdir= go together")
    return opts


def _apply(opts: MountOptions, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        if key == "volatile":
            opts.volatile = True
            opts.fsync = False
        elif key in ("squash_to_root",):
            opts.squash_to_uid = opts.squash_to_gid = 0
        elif key == "static_nlink":
            opts.static_nlink = True
        elif key == "ro":
            opts.readonly = True
            opts.kernel_flags.append(key)
        elif key in _KERNEL_FLAGS:
            opts.kernel_flags.append(key)
        elif key not in _ACCEPTED_FLAGS:
            raise StrataError(f"unknown option: {key}")
        return
    if key == "lowerdir":
        opts.lowerdirs = _split_lowerdir(value)
    elif key in ("upperdir", "workdir"):
        if not value:
            raise StrataError(f"{key}= is empty")
        setattr(opts, key, value)
    elif key == "fsync":
        opts.fsync = _bool_value(key, value)
    elif key == "timeout":
        try:
            opts.timeout = float(value)
        except ValueError:
            raise StrataError(f"timeout={value}: expected seconds") from None
        if not opts.timeout >= 0:
            raise StrataError(f"timeout={value}: expected seconds >= 0")
    elif key == "spin":
        opts.spin_us = _int_value(key, value)
        if opts.spin_us > 1_000_000:
            raise StrataError(f"spin={value}: at most 1000000 microseconds")
    elif key == "squash_to_uid":
        opts.squash_to_uid = _int_value(key, value)
    elif key == "squash_to_gid":
        opts.squash_to_gid = _int_value(key, value)
    elif key == "uidmapping":
        opts.uidmapping = IdMapping.parse(key, value)
    elif key == "gidmapping":
        opts.gidmapping = IdMapping.parse(key, value)
    elif key == "noxattrs":
        opts.xattrs = not _bool_value(key, value)
    elif key == "redirect_dir":
        if value not in ("on", "follow", "nofollow", "off"):
            raise StrataError(f"redirect_dir={value}: expected on, follow, nofollow or off")
        opts.redirect_dir = value == "on"
    elif key == "source":
        opts.fsname = value or opts.fsname
    elif key not in _ACCEPTED_VALUES:
        raise StrataError(f"unknown option: {key}")


def check_dirs(opts: MountOptions, mountpoint: str) -> None:
    """Refuse what the kernel's overlayfs refuses, before anything is mounted."""
    if not os.path.isdir(mountpoint):
        raise StrataError(f"mountpoint {mountpoint}: not a directory")
    for d in opts.lowerdirs:
        if not os.path.isdir(d):
            raise StrataError(f"lowerdir {d}: no such directory")
    if opts.upperdir is None or opts.workdir is None:
        return
    for key, d in (("upperdir", opts.upperdir), ("workdir", opts.workdir)):
        if not os.path.isdir(d):
            raise StrataError(f"{key} {d}: no such directory")
    if os.stat(opts.upperdir).st_dev != os.stat(opts.workdir).st_dev:
        raise StrataError("workdir and upperdir must be on the same filesystem")
    up, work = os.path.realpath(opts.upperdir), os.path.realpath(opts.workdir)
    if up == work or work.startswith(up + "/") or up.startswith(work + "/"):
        raise StrataError("workdir and upperdir must be separate directories, neither inside the other")
