"""`pause` and `unpause`: freeze and thaw every process of a container through its
cgroup's freezer (v1's freezer controller, v2's cgroup.freeze). The kernel keeps
the state: `Container.status()` reads it back, nothing is recorded."""

from __future__ import annotations

from common.errors import StrataError
from runtime.containers import Container


def pause(c: Container) -> None:
    if not c.status().can_pause():
        raise StrataError(f"container {c.name} is not running")
    c.cgroup().freeze()


def unpause(c: Container) -> None:
    if not c.status().can_unpause():
        raise StrataError(f"container {c.name} is not paused")
    c.cgroup().thaw()
