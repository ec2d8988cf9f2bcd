"""The containers of a state root: finding them, and one container's live view.

On disk, under `<state root>/containers/<id>/`:

    container.json   the record (runtime.record), replaced atomically
    init/            the init layer: mount points the runtime owns (/proc, /dev, /sys,
                     /etc/hosts...), a lowerdir above the image so they never land in
                     the container's own layer
    upper/, work/    the container's layer (what `diff` and `commit` read)
    merged/          where its root is mounted while it runs
    hostname, hosts, resolv.conf, container.log, seccomp.json (a profile given at create)

`Runtime` is the state root: lookup by name or id, the image store, the lock that
keeps names unique. `Container` is one record with the kernel's view of it: its
live `status()` and the lock every change of the record is made under. The verbs
live in their own modules, one group each: create, monitor (start), execute
(exec), stop (kill, stop, wait), pause, remove (rm), layer (diff, commit,
export), inspection (inspect, top), prune.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from common.errors import StrataError
from common.paths import private_dir, state_root
from images.store import Store
from runtime import cgroups, process, record
from runtime.record import Record, Status


class Container:
    """A container's record and what the kernel says about it."""

    def __init__(self, runtime: Runtime, rec: Record) -> None:
        self.rt = runtime
        self.record = rec
        self._lock_depth = 0

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def dir(self) -> Path:
        return self.rt.containers_dir / self.id

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    def cgroup(self) -> cgroups.Cgroup:
        return cgroups.cgroup(self.id, self.record.host_config.cgroup)

    def process_alive(self) -> bool:
        st = self.record.state
        return bool(st.pid) and process.alive(st.pid, st.start_time)

    def monitor_alive(self) -> bool:
        st = self.record.state
        if not st.monitor_pid:
            return False
        return process.alive(st.monitor_pid, st.monitor_start_time)

    def status(self) -> Status:
        """What the kernel says, not only the record: a recorded running container whose
        process is gone has exited; a frozen one is paused."""
        recorded = self.record.state.status
        if recorded.is_up():
            if not self.process_alive():
                return Status.EXITED
            return Status.PAUSED if self.cgroup().frozen() else Status.RUNNING
        return recorded

    def reload(self) -> Container:
        self.record = record.load(self.dir)
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The container's lock, re-entrant within this object (teardown edits the record
        inside a verb that holds it). Taking it reloads the record."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with open(self.dir / "lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            self.reload()
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    @contextlib.contextmanager
    def editing(self) -> Iterator[Record]:
        """The freshly read record under the lock, saved when the block ends normally."""
        with self.locked():
            yield self.record
            record.save(self.dir, self.record)


class Runtime:
    """All containers of a state root."""

    def __init__(self, root: str | None = None) -> None:
        # Absolute: a detached monitor leaves the caller's working directory.
        self.root = state_root(root).absolute()
        self.root_arg = str(self.root)
        self.containers_dir = self.root / "containers"
        self.store = Store(self.root_arg)
        private_dir(self.containers_dir)

    def all(self) -> list[Container]:
        """Every readable container, newest first (an unreadable record is skipped)."""
        out = []
        for d in self.containers_dir.iterdir():
            if d.is_dir() and record.exists(d):
                with contextlib.suppress(StrataError):
                    out.append(Container(self, record.load(d)))
        return sorted(out, key=lambda c: c.record.created, reverse=True)

    def get(self, ref: str) -> Container:
        """By name, full id or unique id prefix."""
        all_ = self.all()
        for c in all_:
            if c.name == ref.lstrip("/") or c.id == ref:
                return c
        found = [c for c in all_ if len(ref) >= 3 and c.id.startswith(ref)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise StrataError(f"container id prefix {ref!r} is ambiguous")
        raise StrataError(f"no such container: {ref}")

    @contextlib.contextmanager
    def names_locked(self) -> Iterator[None]:
        """Held while a name is checked free and taken."""
        with open(self.containers_dir / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield
