"""Which devices a container may use, as Docker decides it: a short allow-list (null,
zero, full, random, urandom, tty, console, ptmx, pts/*) plus `mknod` of any node but
no open of it, `--device` adding one, `--privileged` lifting the rules.

The rules go to the cgroup: as lines for cgroup v1's devices controller, and on
cgroup v2 (which has no devices controller) as a BPF_PROG_TYPE_CGROUP_DEVICE program
attached to the container's group with bpf(2), the way runc and crun do it. Without
them, container root could `mknod` a host disk and read or write it."""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import struct
from dataclasses import dataclass

from common.errors import StrataError
from common.kernel import libc as _libc


@dataclass(frozen=True)
class Rule:
    """An allow rule: type `c` or `b`, major/minor (None: any), access from `rwm`."""

    kind: str
    major: int | None
    minor: int | None
    access: str

    def v1(self) -> str:
        """The line for devices.allow."""
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.kind} {major}:{minor} {self.access}"


# Docker's default (moby oci/defaults.go and daemon/oci_linux.go): mknod of anything,
# open only of these.
DEFAULT_RULES = (
    Rule("c", None, None, "m"), Rule("b", None, None, "m"),
    Rule("c", 1, 3, "rwm"), Rule("c", 1, 5, "rwm"), Rule("c", 1, 7, "rwm"),  # null zero full
    Rule("c", 1, 8, "rwm"), Rule("c", 1, 9, "rwm"),  # random urandom
    Rule("c", 5, 0, "rwm"), Rule("c", 5, 1, "rwm"), Rule("c", 5, 2, "rwm"),  # tty console ptmx
    Rule("c", 136, None, "rwm"),  # pts/*
)


@dataclass(frozen=True)
class Device:
    """A host device node made in the container at `path` and allowed with `access`."""

    path: str
    kind: str
    major: int
    minor: int
    mode: int
    uid: int
    gid: int
    access: str = "rwm"

    def rule(self) -> Rule:
        return Rule(self.kind, self.major, self.minor, self.access)


@dataclass(frozen=True)
class Mapping:
    """A `--device` as given: the host node, where it appears, the access (docker's
    HostConfig.Devices entry). Resolved to a Device when the container starts, since
    a node's numbers may change in between."""

    host: str
    container: str
    access: str = "rwm"

    def resolve(self) -> Device:
        return resolve(self.host, self.container, self.access)


def _valid_access(text: str) -> bool:
    return bool(text) and set(text) <= set("rwm") and len(set(text)) == len(text)


def parse(spec: str) -> Mapping:
    """`--device /dev/x[:/dev/y][:rwm]`; the host node must exist now."""
    parts = spec.split(":")
    src, dst, access = parts[0], "", "rwm"
    if len(parts) == 3:
        dst, access = parts[1], parts[2]
    elif len(parts) == 2:
        if _valid_access(parts[1]):
            access = parts[1]
        else:
            dst = parts[1]
    elif len(parts) != 1:
        raise StrataError(f"invalid device specification {spec!r}: expected /dev/x[:/dev/y][:rwm]")
    dst = dst or src
    if not src.startswith("/") or not dst.startswith("/"):
        raise StrataError(f"invalid device specification {spec!r}: paths must be absolute")
    if not _valid_access(access):
        raise StrataError(f"invalid device permissions {access!r} in {spec!r}: use r, w and m")
    mapping = Mapping(src, dst, access)
    mapping.resolve()
    return mapping


def resolve(host: str, path: str, access: str = "rwm") -> Device:
    """The host node at `host` (symlinks followed, as docker does) as a Device at `path`."""
    try:
        st = os.stat(host)
    except OSError as e:
        raise StrataError(f"error gathering device information for {host}: {e.strerror}") from None
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        raise StrataError(f"{host} is not a device node")
    return Device(path, kind, os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode),
                  st.st_uid, st.st_gid, access)


# The nodes every container's /dev has (bound from the host's).
STANDARD = ("null", "zero", "full", "random", "urandom", "tty")
# Made by the runtime itself (rootfs), or not devices of the host's own.
_HOST_SKIP = (*STANDARD, "pts", "shm", "mqueue", "console", "ptmx", "fd", "stdin", "stdout", "stderr")


def host_devices() -> list[Device]:
    """Every device node under the host's /dev, for --privileged (as docker gives it)."""
    found: list[Device] = []
    for dirpath, dirnames, filenames in os.walk("/dev"):
        if dirpath == "/dev":
            dirnames[:] = [d for d in dirnames if d not in _HOST_SKIP]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if dirpath == "/dev" and name in _HOST_SKIP:
                continue
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                found.append(resolve(full, full))
    return found


# --- cgroup v2: the device program ---------------------------------------------------------

_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_DEVCG_TYPE = {"b": 1, "c": 2}
_DEVCG_ACCESS = {"m": 1, "r": 2, "w": 4}
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
# Opcodes (linux/bpf_common.h + bpf.h): class | op | source.
_LDX_W = 0x61     # BPF_LDX | BPF_MEM | BPF_W
_AND32_K = 0x54   # BPF_ALU | BPF_AND | BPF_K
_RSH32_K = 0x74   # BPF_ALU | BPF_RSH | BPF_K
_MOV32_K = 0xB4   # BPF_ALU | BPF_MOV | BPF_K
_MOV32_X = 0xBC   # BPF_ALU | BPF_MOV | BPF_X
_JNE_K = 0x55     # BPF_JMP | BPF_JNE | BPF_K
_JNE_X = 0x5D     # BPF_JMP | BPF_JNE | BPF_X
_EXIT = 0x95      # BPF_JMP | BPF_EXIT


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)


def program(rules: list[Rule]) -> bytes:
    """The device program for an allow-list: the context (struct bpf_cgroup_dev_ctx:
    access_type = access << 16 | type, major, minor) is read into R2..R5, then one block
    per rule returns 1 (allow) when type, access, major and minor match; otherwise 0.
    The shape of runc's devicefilter."""
    head = [
        _insn(_LDX_W, 2, 1, 0), _insn(_AND32_K, 2, imm=0xFFFF),  # R2 = type
        _insn(_LDX_W, 3, 1, 0), _insn(_RSH32_K, 3, imm=16),      # R3 = requested access
        _insn(_LDX_W, 4, 1, 4),                                  # R4 = major
        _insn(_LDX_W, 5, 1, 8),                                  # R5 = minor
    ]
    out = b"".join(head)
    for rule in rules:
        access = sum(_DEVCG_ACCESS[a] for a in rule.access)
        # A tuple (op, dst, src, imm) is a test jumping past this block when it fails.
        block: list[tuple[int, int, int, int] | bytes] = [(_JNE_K, 2, 0, _DEVCG_TYPE[rule.kind])]
        if access != 7:  # the requested access must be a subset: (R3 & access) == R3
            block += [_insn(_MOV32_X, 1, 3), _insn(_AND32_K, 1, imm=access), (_JNE_X, 1, 3, 0)]
        if rule.major is not None:
            block.append((_JNE_K, 4, 0, rule.major))
        if rule.minor is not None:
            block.append((_JNE_K, 5, 0, rule.minor))
        block += [_insn(_MOV32_K, 0, imm=1), _insn(_EXIT)]
        for i, item in enumerate(block):
            if isinstance(item, tuple):
                op, dst, src, imm = item
                item = _insn(op, dst, src, len(block) - i - 1, imm)
            out += item
    return out + _insn(_MOV32_K, 0, imm=0) + _insn(_EXIT)


class _LoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise StrataError(f"cgroup v2 device rules: bpf(2) number unknown on {platform.machine()}")
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr),
                            ctypes.c_uint(ctypes.sizeof(attr))))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def attach_program(cgroup_dir: str, rules: list[Rule]) -> None:
    """Load the device program for `rules` and attach it to the cgroup v2 directory; the
    kernel keeps it for the group's life (our fds are closed)."""
    code = program(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"Apache")
    log = ctypes.create_string_buffer(65536)
    load = _LoadAttr(prog_type=_BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(code) // 8,
                     insns=ctypes.addressof(insns), license=ctypes.addressof(license), log_level=1,
                     log_size=len(log), log_buf=ctypes.addressof(log), prog_name=b"strata_devices")
    try:
        prog = _bpf(_BPF_PROG_LOAD, load)
    except OSError as e:
        verifier = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise StrataError(f"loading the device program: {e.strerror} {verifier[0]}".strip()) from None
    try:
        dirfd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _bpf(_BPF_PROG_ATTACH, _AttachAttr(target_fd=dirfd, attach_bpf_fd=prog,
                                               attach_type=_BPF_CGROUP_DEVICE,
                                               attach_flags=_BPF_F_ALLOW_MULTI))
        except OSError as e:
            raise StrataError(f"attaching the device program to {cgroup_dir}: {e.strerror}") from None
        finally:
            os.close(dirfd)
    finally:
        os.close(prog)
