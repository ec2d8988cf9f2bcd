"""The `-o` option string of strata-unionfs, as podman, mount.fuse3 and
containerd write it.

The string is fuse-overlayfs's: layer options, fuse-overlayfs's own tuning
options and generic mount options mixed, with empty items allowed (podman
writes `,,volatile` and trailing commas). Every option fuse-overlayfs accepts
is accepted here. `TABLE` declares each option once: the parser, `--help` and
README.md's table (checked by a test) come from it. Anything else is an
error, so a typo never silently gives a different filesystem.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from common.errors import StrataError


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
    # FUSE passthrough for the files where it is safe (see fs.UnionFS._open_file).
    passthrough: bool = True
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


# Generic mount options the kernel's FUSE mount takes (libfuse passes them on).
KERNEL_FLAGS = ("ro", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                "relatime", "norelatime", "strictatime", "nodiratime", "diratime", "sync", "async",
                "dirsync", "lazytime", "nolazytime")
# Generic mount(8) options that mean nothing to a FUSE mount.
_MOUNT8_FLAGS = ("mand", "nomand", "silent", "loud")
# Accepted for compatibility; the table's text says why each needs nothing from us.
_ACCEPTED_FLAGS = ("allow_other", "allow_root", "default_permissions", "noacl", "acl", "userxattr",
                   "auto_unmount", "nonempty", "defaults", "auto", "noauto", "user", "nouser", "users",
                   "_netdev", "nofail", "x-systemd.automount")
_ACCEPTED_VALUES = ("threaded", "xino", "index", "metacopy", "nfs_export", "context",
                    "fscontext", "defcontext", "rootcontext", "max_read", "blksize", "plugins",
                    "max_idle_threads", "fsname", "subtype", "uid", "gid", "rootmode", "user_id",
                    "group_id", "x-systemd.requires", "x-systemd.after", "comment", "uuid", "volkey")

Apply = Callable[[MountOptions, str, str], None]  # (options, key, value)


class Option:
    """One row of the option table: the names it is written as, whether it takes
    `=VALUE`, what it does to MountOptions (None: accepted and ignored), and the
    text `--help` and README.md show (README's table is checked against it). A
    plain class: a dataclass here cost 1.3 ms of every mount's start-up."""

    __slots__ = ("apply", "doc", "names", "shown", "takes_value")

    def __init__(self, names: tuple[str, ...], shown: str, doc: str, apply: Apply | None,
                 takes_value: bool = True) -> None:
        self.names, self.shown, self.doc, self.apply = names, shown, doc, apply
        self.takes_value = takes_value


def _set(attr: str, convert: Callable[[str, str], object]) -> Apply:
    def apply(opts: MountOptions, key: str, value: str) -> None:
        setattr(opts, attr, convert(key, value))
    return apply


def _path(key: str, value: str) -> str:
    if not value:
        raise StrataError(f"{key}= is empty")
    return value


def _volatile(opts: MountOptions, key: str, value: str) -> None:
    opts.volatile = True
    opts.fsync = False


def _squash_to_root(opts: MountOptions, key: str, value: str) -> None:
    opts.squash_to_uid = opts.squash_to_gid = 0


def _static_nlink(opts: MountOptions, key: str, value: str) -> None:
    opts.static_nlink = True


def _kernel_flag(opts: MountOptions, key: str, value: str) -> None:
    if key in KERNEL_FLAGS:
        opts.kernel_flags.append(key)
    opts.readonly = opts.readonly or key == "ro"


def _timeout(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise StrataError(f"timeout={value}: expected seconds") from None
    if not seconds >= 0:
        raise StrataError(f"timeout={value}: expected seconds >= 0")
    return seconds


def _spin(key: str, value: str) -> int:
    n = _int_value(key, value)
    if n > 1_000_000:
        raise StrataError(f"spin={value}: at most 1000000 microseconds")
    return n


def _redirect_dir(key: str, value: str) -> bool:
    if value not in ("on", "follow", "nofollow", "off"):
        raise StrataError(f"redirect_dir={value}: expected on, follow, nofollow or off")
    return value == "on"


def _noxattrs(opts: MountOptions, key: str, value: str) -> None:
    opts.xattrs = not _bool_value(key, value)


def _source(opts: MountOptions, key: str, value: str) -> None:
    opts.fsname = value or opts.fsname


def _code(names: tuple[str, ...]) -> str:
    return ", ".join(f"`{n}`" for n in names)


TABLE: tuple[Option, ...] = (
    Option(("lowerdir",), "`lowerdir=A:B`",
           "read-only layers, leftmost on top; `\\:` escapes a colon in a path",
           _set("lowerdirs", lambda k, v: _split_lowerdir(v))),
    Option(("upperdir",), "`upperdir=`, `workdir=`",
           "the writable layer and its scratch directory (same filesystem)", _set("upperdir", _path)),
    Option(("workdir",), "", "", _set("workdir", _path)),
    Option(("volatile",), "`volatile`",
           "no fsync of copied-up data or on `fsync(2)` (podman passes it for volatile containers)",
           _volatile, takes_value=False),
    Option(("fsync",), "`fsync=0` / `fsync=1`", "the same switch on its own", _set("fsync", _bool_value)),
    Option(("timeout",), "`timeout=SECS`",
           "how long the kernel may cache entries and attributes (default 10^9: strata is the only writer)",
           _set("timeout", _timeout)),
    Option(("spin",), "`spin=USECS`",
           "after each reply, poll this long for the next request before sleeping (default 100; 0: "
           "always sleep). A client asking again within that time skips the daemon's wake-up, which on "
           "a VM with halted idle vCPUs is most of a round trip: stat of 2,000 lower files 0.30 s -> "
           "0.15 s. Costs CPU only while requests flow", _set("spin_us", _spin)),
    Option(("squash_to_root",), "`squash_to_root`, `squash_to_uid=N`, `squash_to_gid=N`",
           "show every file as owned by that id", _squash_to_root, takes_value=False),
    Option(("squash_to_uid",), "", "", _set("squash_to_uid", lambda k, v: _int_value(k, v))),
    Option(("squash_to_gid",), "", "", _set("squash_to_gid", lambda k, v: _int_value(k, v))),
    Option(("uidmapping",), "`uidmapping=IN:OUT:N[:...]`, `gidmapping=`",
           "show on-disk id OUT+k as IN+k; new files get the mapped-back id",
           _set("uidmapping", IdMapping.parse)),
    Option(("gidmapping",), "", "", _set("gidmapping", IdMapping.parse)),
    Option(("redirect_dir",), "`redirect_dir=on` (default) / `off`, `follow`, `nofollow`",
           "whether a directory from a lower layer can be renamed; otherwise `EXDEV`, as the kernel's "
           "overlayfs", _set("redirect_dir", _redirect_dir)),
    Option(("passthrough",), "`passthrough=1` (default) / `passthrough=0`",
           "FUSE passthrough (kernel 6.9+): the kernel reads and writes the backing file itself, at "
           "the kernel overlayfs's speed, for files in the upper layer and every file of a read-only "
           "mount. Not for lower files of a writable mount: a copy-up cannot move the kernel's open "
           "files off the lower copy. Where the kernel refuses, files are served through requests",
           _set("passthrough", _bool_value)),
    Option(("static_nlink",), "`static_nlink`",
           "directories report a link count of 1 (as merged directories always do)",
           _static_nlink, takes_value=False),
    Option(("noxattrs",), "`noxattrs=1`", "no extended attributes through the mount", _noxattrs),
    Option(("source",), "`source=NAME`", "the name the mount table shows (as mount.fuse3 passes it)",
           _source),
    Option(KERNEL_FLAGS + _MOUNT8_FLAGS, "`ro`, `rw`, `nodev`, `nosuid`, `noexec`, `noatime`, `sync`, ...",
           "passed to the kernel mount; `dev` and `suid` are on unless `nodev`/`nosuid`",
           _kernel_flag, takes_value=False),
    Option(_ACCEPTED_FLAGS, "`noacl`, `userxattr`, `allow_other`, `default_permissions`, ...",
           "accepted for compatibility: strata-unionfs always serves every user (`allow_other`, kernel "
           "permission checks)", None, takes_value=False),
    Option(_ACCEPTED_VALUES, "`threaded=`, `xino=`, `index=`, `metacopy=`, `context=`, ...",
           "accepted for compatibility: strata-unionfs has one thread of requests, keeps inode numbers "
           "stable on its own, never copies metadata only", None),
)
_BY_NAME = {(name, o.takes_value): o for o in TABLE for name in o.names}


def markdown_table() -> str:
    """The README's option table, as the parser reads the options."""
    rows = ["| option | effect |", "|---|---|"]
    rows += [f"| {o.shown} | {o.doc} |" for o in TABLE if o.shown]
    return "\n".join(rows)


def help_text() -> str:
    """The option names for `--help`."""
    return ", ".join(", ".join(n + ("=" if o.takes_value else "") for n in o.names[:4])
                     + (", ..." if len(o.names) > 4 else "") for o in TABLE)


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
    option = _BY_NAME.get((key, bool(sep)))
    if option is None:
        raise StrataError(f"unknown option: {key}")
    if option.apply is not None:
        option.apply(opts, key, value)


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
