"""Control groups for containers, v1 and v2 behind one interface: a group per
container under `strata/` in each hierarchy, resource limits (memory, cpu, pids),
the device allow-list (v1's devices controller, a BPF device program on v2), the
freezer for pause/unpause, and the list of member processes.

Which version: $STRATA_CGROUP (`v1` or `v2`), else v2 when /sys/fs/cgroup is a
unified (cgroup2-only) mount, else v1. On a hybrid machine the v2 mount carries
no memory/cpu/pids controllers (they are bound to v1): asking v2 for a limit it
cannot enforce is an error, never silently ignored."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from common import cgroupfs
from common.errors import StrataError
from runtime import devices

PARENT = "strata"
V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer", "devices")
CFS_PERIOD = 100_000


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.cpus, self.pids))


def v1_mounts() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for mnt, fstype, sopts in cgroupfs.mountinfo():
        if fstype == "cgroup":
            for opt in sopts.split(","):
                if opt in V1_CONTROLLERS and opt not in found:
                    found[opt] = Path(mnt)
    return found


def v2_mount() -> Path | None:
    return next((Path(m) for m, fstype, _ in cgroupfs.mountinfo() if fstype == "cgroup2"), None)


def default_version() -> str:
    chosen = os.environ.get("STRATA_CGROUP")
    if chosen:
        if chosen not in ("v1", "v2"):
            raise StrataError(f"STRATA_CGROUP must be v1 or v2, not {chosen!r}")
        return chosen
    unified = v2_mount()
    return "v2" if unified == Path("/sys/fs/cgroup") else "v1"


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise StrataError(f"cgroup: cannot write {value!r} to {path}: {e.strerror}") from None


def _rmdir(path: Path) -> None:
    """Remove a cgroup dir, waiting briefly for the kernel to let go of dying members."""
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.02)
    raise StrataError(f"cgroup {path} still has members")


class Cgroup:
    """One container's group. `dirs` are its directories (one per v1 hierarchy)."""

    version = ""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def dirs(self) -> list[Path]:
        raise NotImplementedError

    def create(self, limits: Limits) -> None:
        raise NotImplementedError

    def allow_devices(self, rules: list[devices.Rule]) -> None:
        """Deny every device but `rules` to the group's members (call before any joins)."""
        raise NotImplementedError

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    def frozen(self) -> bool:
        raise NotImplementedError

    def oom_killed(self) -> bool:
        raise NotImplementedError

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)

    def destroy(self) -> None:
        """Kill whatever is left in the group and remove it."""
        if not self.exists():
            return
        with contextlib.suppress(StrataError):
            self.thaw()
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for d in self.dirs:
            _rmdir(d)


class CgroupV1(Cgroup):
    version = "v1"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.mounts = v1_mounts()

    @property
    def dirs(self) -> list[Path]:
        return [m / PARENT / self.name for m in self.mounts.values()]

    def _dir(self, controller: str) -> Path:
        if controller not in self.mounts:
            raise StrataError(f"cgroup v1 controller {controller} is not mounted")
        return self.mounts[controller] / PARENT / self.name

    def create(self, limits: Limits) -> None:
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        if limits.memory is not None:
            mem = self._dir("memory")
            _write(mem / "memory.limit_in_bytes", str(limits.memory))
            swap = mem / "memory.memsw.limit_in_bytes"
            if swap.exists():  # no swap beyond the limit, as docker does by default (memory-swap = 2x)
                _write(swap, str(2 * limits.memory))
        if limits.cpus is not None:
            cpu = self._dir("cpu")
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD))
            _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpus * CFS_PERIOD)))
        if limits.pids is not None:
            _write(self._dir("pids") / "pids.max", str(limits.pids))

    def allow_devices(self, rules: list[devices.Rule]) -> None:
        d = self._dir("devices")
        _write(d / "devices.deny", "a")
        for rule in rules:
            _write(d / "devices.allow", rule.v1())

    def freeze(self) -> None:
        state = self._dir("freezer") / "freezer.state"
        _write(state, "FROZEN")
        for _ in range(500):
            if state.read_text().strip() == "FROZEN":
                return
            time.sleep(0.01)
        raise StrataError(f"cgroup {self.name} did not freeze")

    def thaw(self) -> None:
        _write(self._dir("freezer") / "freezer.state", "THAWED")

    def frozen(self) -> bool:
        try:
            return (self._dir("freezer") / "freezer.state").read_text().strip() != "THAWED"
        except (FileNotFoundError, StrataError):
            return False

    def oom_killed(self) -> bool:
        try:
            ctl = (self._dir("memory") / "memory.oom_control").read_text()
        except (FileNotFoundError, StrataError):
            return False
        return any(line.startswith("oom_kill ") and line.split()[1] != "0" for line in ctl.splitlines())


class CgroupV2(Cgroup):
    version = "v2"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        root = v2_mount()
        if root is None:
            raise StrataError("no cgroup2 hierarchy is mounted")
        self.root = root

    @property
    def dirs(self) -> list[Path]:
        return [self.root / PARENT / self.name]

    def create(self, limits: Limits) -> None:
        parent = self.root / PARENT
        parent.mkdir(exist_ok=True)
        wanted = [c for c, v in (("memory", limits.memory), ("cpu", limits.cpus), ("pids", limits.pids))
                  if v is not None]
        available = (self.root / "cgroup.controllers").read_text().split()
        missing = [c for c in wanted if c not in available]
        if missing:
            raise StrataError(
                f"cgroup v2 at {self.root} has no {', '.join(missing)} controller "
                "(bound to a v1 hierarchy on this machine): use cgroup v1 for limits"
            )
        for c in wanted:
            if c not in (self.root / "cgroup.subtree_control").read_text().split():
                _write(self.root / "cgroup.subtree_control", f"+{c}")
            if c not in (parent / "cgroup.subtree_control").read_text().split():
                _write(parent / "cgroup.subtree_control", f"+{c}")
        d = self.dirs[0]
        d.mkdir(exist_ok=True)
        if limits.memory is not None:
            _write(d / "memory.max", str(limits.memory))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", str(limits.memory))
        if limits.cpus is not None:
            _write(d / "cpu.max", f"{int(limits.cpus * CFS_PERIOD)} {CFS_PERIOD}")
        if limits.pids is not None:
            _write(d / "pids.max", str(limits.pids))

    def allow_devices(self, rules: list[devices.Rule]) -> None:
        devices.attach_program(str(self.dirs[0]), rules)

    def _events(self) -> dict[str, str]:
        try:
            lines = (self.dirs[0] / "cgroup.events").read_text().splitlines()
        except FileNotFoundError:
            return {}
        return dict(line.split(" ", 1) for line in lines)

    def freeze(self) -> None:
        _write(self.dirs[0] / "cgroup.freeze", "1")
        for _ in range(500):
            if self._events().get("frozen") == "1":
                return
            time.sleep(0.01)
        raise StrataError(f"cgroup {self.name} did not freeze")

    def thaw(self) -> None:
        _write(self.dirs[0] / "cgroup.freeze", "0")

    def frozen(self) -> bool:
        return self._events().get("frozen") == "1"

    def oom_killed(self) -> bool:
        try:
            events = (self.dirs[0] / "memory.events").read_text().split()
        except FileNotFoundError:
            return False
        return "oom_kill" in events and events[events.index("oom_kill") + 1] != "0"

    def destroy(self) -> None:
        kill = self.dirs[0] / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        super().destroy()


def cgroup(name: str, version: str | None = None) -> Cgroup:
    """The container's group in the given (or the default) cgroup version."""
    return CgroupV2(name) if (version or default_version()) == "v2" else CgroupV1(name)


def leftovers() -> list[Cgroup]:
    """Every container group in either version, for prune to compare with live containers."""
    found: dict[str, Cgroup] = {}
    for m in v1_mounts().values():
        for d in (m / PARENT).glob("*") if (m / PARENT).is_dir() else []:
            if d.is_dir():
                found.setdefault(f"v1/{d.name}", CgroupV1(d.name))
    root = v2_mount()
    if root is not None and (root / PARENT).is_dir():
        for d in (root / PARENT).iterdir():
            if d.is_dir():
                found.setdefault(f"v2/{d.name}", CgroupV2(d.name))
    return list(found.values())
