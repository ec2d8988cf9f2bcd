"""Seccomp for container processes: Docker's default profile, translated at run time
into a libseccomp filter (through pyseccomp) for the container's capabilities.

The default profile is the one Debian installs with golang-github-containers-common,
/usr/share/containers/seccomp.json (Docker's default as containers/common ships it);
strata keeps no copy. containers/common 0.50 (Debian 12) allows outright some calls
that Docker's own default allows only with a capability, or never (user namespaces,
mounts, keyrings): DOCKER_STRICTER puts Docker's rules back for those, so a strata
container blocks at least what a docker one does. `--security-opt seccomp=FILE` loads
any profile in the same format (names, args with their ops, includes and excludes by
caps, arches and minKernel, defaultAction, errnoRet); `seccomp=unconfined` loads none.

The filter is built in the monitor, before the container's root replaces the host's
(libseccomp is loaded there), and loaded by the container's process before exec."""

from __future__ import annotations

import errno
import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyseccomp

from common.errors import StrataError

DEFAULT_PROFILE = "/usr/share/containers/seccomp.json"
_SYS_ADMIN_CALLS = ["unshare", "setns", "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig",
                    "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "name_to_handle_at"]
_CLONE_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def _gated(names: list[str], cap: str) -> list[dict[str, Any]]:
    """Allowed with `cap`, EPERM without (the form containers/common writes such rules in)."""
    return [{"names": names, "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}},
            {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM,
             "excludes": {"caps": [cap]}}]


# Docker's default rules (docs: "Significant syscalls blocked by the default profile") for
# the calls containers/common's profile relaxes; they replace its rules for these names.
DOCKER_STRICTER: list[dict[str, Any]] = [
    {"names": ["keyctl", "add_key", "request_key"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
    *_gated(_SYS_ADMIN_CALLS, "CAP_SYS_ADMIN"),
    {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]},
     "args": [{"index": 0, "value": _CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
    # ENOSYS, not EPERM: libc then falls back to clone, whose flags the rule above can see.
    {"names": ["clone3"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS,
     "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
    *_gated(["process_vm_readv", "process_vm_writev", "pidfd_getfd"], "CAP_SYS_PTRACE"),
    *_gated(["mbind", "get_mempolicy", "set_mempolicy"], "CAP_SYS_NICE"),
    *_gated(["reboot"], "CAP_SYS_BOOT"),
    *_gated(["syslog"], "CAP_SYSLOG"),
]

_ACTIONS = {"SCMP_ACT_ALLOW": pyseccomp.ALLOW, "SCMP_ACT_KILL": pyseccomp.KILL_THREAD,
            "SCMP_ACT_KILL_THREAD": pyseccomp.KILL_THREAD, "SCMP_ACT_KILL_PROCESS": pyseccomp.KILL_PROCESS,
            "SCMP_ACT_TRAP": pyseccomp.TRAP, "SCMP_ACT_LOG": pyseccomp.LOG}
_OPS = {"SCMP_CMP_NE": pyseccomp.NE, "SCMP_CMP_LT": pyseccomp.LT, "SCMP_CMP_LE": pyseccomp.LE,
        "SCMP_CMP_EQ": pyseccomp.EQ, "SCMP_CMP_GE": pyseccomp.GE, "SCMP_CMP_GT": pyseccomp.GT,
        "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ}
_ARCHES = {f"SCMP_ARCH_{n}": getattr(pyseccomp.Arch, n) for n in dir(pyseccomp.Arch)
           if n.isupper() and n != "NATIVE"}
# The profile's "arches" are Go's names for the architecture strata runs on.
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i386": "x86", "i686": "x86"}


def load(path: str | Path) -> dict[str, Any]:
    """A profile file, parsed and checked to be an object with a syscalls list."""
    try:
        profile = json.loads(Path(path).read_text())
    except OSError as e:
        raise StrataError(f"seccomp profile {path}: {e.strerror}") from None
    except ValueError as e:
        raise StrataError(f"seccomp profile {path}: not JSON: {e}") from None
    if not isinstance(profile, dict) or not isinstance(profile.get("syscalls", []), list):
        raise StrataError(f"seccomp profile {path}: expected an object with a syscalls list")
    return profile


def default_profile() -> dict[str, Any]:
    """containers/common's profile with Docker's stricter rules in place of its own."""
    try:
        profile = load(DEFAULT_PROFILE)
    except StrataError as e:
        raise StrataError(f"{e} (install golang-github-containers-common: make deps)") from None
    stricter = {n for rule in DOCKER_STRICTER for n in rule["names"]}
    rules = []
    for rule in profile.get("syscalls") or []:
        names = [n for n in _names(rule) if n not in stricter]
        if names:
            rules.append({**rule, "names": names})
    return {**profile, "syscalls": rules + DOCKER_STRICTER}


def _names(rule: dict[str, Any]) -> list[str]:
    names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StrataError(f"seccomp profile: bad names in rule {rule!r:.80}")
    return names


def _action(name: Any, errno_ret: Any) -> int:
    code = errno.EPERM if errno_ret is None else errno_ret
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code < 4096:
        raise StrataError(f"seccomp profile: bad errnoRet {errno_ret!r}")
    if name == "SCMP_ACT_ERRNO":
        return int(pyseccomp.ERRNO(code))
    if name == "SCMP_ACT_TRACE":
        return int(pyseccomp.TRACE(code))
    if name not in _ACTIONS:
        raise StrataError(f"seccomp profile: unknown action {name!r}")
    return int(_ACTIONS[name])


def _kernel() -> tuple[int, ...]:
    return _version(platform.release())


def _version(text: Any) -> tuple[int, ...]:
    parts = str(text).split("-")[0].split(".")[:2]
    if not all(p.isdigit() for p in parts):
        raise StrataError(f"seccomp profile: bad minKernel {text!r}")
    return tuple(int(p) for p in parts)


def _applies(rule: dict[str, Any], caps: set[str], arch: str) -> bool:
    """includes: every listed cap held, our arch listed, kernel at least minKernel;
    excludes: none of those (moby's reading)."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if not all(c in caps for c in inc.get("caps") or []):
        return False
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if inc.get("minKernel") and _kernel() < _version(inc["minKernel"]):
        return False
    if any(c in caps for c in exc.get("caps") or []) or arch in (exc.get("arches") or []):
        return False
    return not (exc.get("minKernel") and _kernel() >= _version(exc["minKernel"]))


def _conditions(rule: dict[str, Any]) -> list[list[pyseccomp.Arg]]:
    """The argument conditions of a rule, as one AND-ed list per libseccomp rule. Several
    conditions on one argument cannot be AND-ed by libseccomp: those become one rule each
    (OR), as runc does."""
    args = rule.get("args") or []
    conds = []
    for a in args:
        try:
            conds.append((int(a["index"]), pyseccomp.Arg(int(a["index"]), _OPS[a["op"]], int(a["value"]),
                                                         int(a.get("valueTwo") or 0))))
        except (KeyError, TypeError, ValueError):
            raise StrataError(f"seccomp profile: bad argument condition {a!r:.80}") from None
    indexes = [i for i, _ in conds]
    if len(set(indexes)) != len(indexes):
        return [[c] for _, c in conds]
    return [[c for _, c in conds]]


def build(profile: dict[str, Any], caps: Iterable[str]) -> pyseccomp.SyscallFilter:
    """The filter for a process holding `caps` (names without CAP_). Not loaded: the
    container's process loads it itself before it execs."""
    held = {f"CAP_{c}" for c in caps}
    arch = _GO_ARCH.get(platform.machine(), platform.machine())
    default = _action(profile.get("defaultAction", "SCMP_ACT_ERRNO"), profile.get("defaultErrnoRet"))
    filt = pyseccomp.SyscallFilter(default)
    filt.set_attr(pyseccomp.Attr.CTL_NNP, 0)  # no_new_privs only when asked for
    native = pyseccomp.system_arch()
    for entry in profile.get("archMap") or []:
        if _ARCHES.get(entry.get("architecture")) == native:
            for sub in entry.get("subArchitectures") or []:
                if sub not in _ARCHES:
                    raise StrataError(f"seccomp profile: unknown architecture {sub!r}")
                if _ARCHES[sub] != native:
                    filt.add_arch(_ARCHES[sub])
    for rule in profile.get("syscalls") or []:
        if not isinstance(rule, dict):
            raise StrataError(f"seccomp profile: bad rule {rule!r:.80}")
        action = _action(rule.get("action"), rule.get("errnoRet"))
        names = _names(rule)
        if action == default or not _applies(rule, held, arch):
            continue
        for name in names:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if number == -1:  # __NR_SCMP_ERROR: not a call libseccomp knows; runc skips these too
                continue
            for conds in _conditions(rule):
                try:
                    filt.add_rule(action, number, *conds)
                except OSError as e:
                    raise StrataError(f"seccomp profile: rule for {name}: {e.strerror}") from None
    return filt

