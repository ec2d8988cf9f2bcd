"""Capabilities of container processes: docker's default set, changed by `--cap-add`,
`--cap-drop` (ALL for either) and `--privileged` as docker changes it. The bounding set
is cut (so no exec can regain the rest) and the process's own sets are reduced with
capset(2)."""

from __future__ import annotations

import ctypes
import os

from common.errors import StrataError
from common.kernel import libc as _libc

CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}
# Docker's default (moby oci/caps/defaults.go).
DEFAULT = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
           "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return max(CAPS.values())


def available() -> tuple[str, ...]:
    """Every capability strata itself holds (what --privileged and --cap-add ALL give):
    root on some hosts lacks a few, and capset(2) cannot grant what the caller lacks."""
    with open("/proc/self/status") as f:
        held = int(next(line.split()[1] for line in f if line.startswith("CapPrm:")), 16)
    return tuple(name for name, num in CAPS.items() if held >> num & 1)


def normalize(names: list[str]) -> list[str]:
    """docker's spellings: any case, with or without CAP_; ALL kept as ALL."""
    out = []
    for name in names:
        bare = name.upper().removeprefix("CAP_")
        if bare != "ALL" and bare not in CAPS:
            raise StrataError(f"unknown capability: {name!r}")
        out.append(bare)
    return out


def tweak(add: list[str], drop: list[str], privileged: bool) -> tuple[str, ...]:
    """The container's set from the defaults, as moby's TweakCapabilities: privileged gets
    all; --cap-add ALL all but the dropped; --cap-drop ALL only the added; otherwise the
    defaults less the dropped plus the added."""
    if privileged:
        return available()
    adds, drops = normalize(add), normalize(drop)
    if "ALL" in adds:
        return tuple(c for c in available() if c not in drops)
    if "ALL" in drops:
        return tuple(dict.fromkeys(adds))
    return tuple(dict.fromkeys([*(c for c in DEFAULT if c not in drops), *adds]))


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: no exec after this gains privileges (setuid bits, file caps)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def become(keep: tuple[str, ...], uid: int, gid: int, groups: list[int]) -> None:
    """Switch to uid/gid/groups holding only `keep`, in runc's order: the bounding set
    first (needs SETPCAP, which the current full set has), then the ids under
    PR_SET_KEEPCAPS (so a set without SETUID or SETGID does not stop the switch), then
    effective, permitted and inheritable with capset(2)."""
    wanted = {CAPS[c] for c in keep}
    for cap in range(_last_cap() + 1):
        if cap not in wanted:
            _prctl(_PR_CAPBSET_DROP, cap, f"dropping capability {cap}")
    _prctl(_PR_SET_KEEPCAPS, 1, "keepcaps")
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    _prctl(_PR_SET_KEEPCAPS, 0, "keepcaps")
    mask = 0
    for cap in wanted:
        mask |= 1 << cap
    data = (_Data * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = part
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
