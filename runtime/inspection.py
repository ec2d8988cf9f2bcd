"""Looking at a container from outside: `inspect` (the record in docker's shape,
with the status the kernel reports) and `top` (its processes, found by PID
namespace)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.errors import StrataError
from runtime import namespaces
from runtime.containers import Container
from runtime.record import to_docker


def inspect(c: Container) -> dict[str, Any]:
    return to_docker(c.record, live=c.status())


def top(c: Container) -> list[tuple[int, str, str]]:
    """(host pid, user, command) of every process in the container's PID namespace."""
    if not c.status().is_up():
        raise StrataError(f"container {c.name} is not running")
    want = namespaces.ns_id(c.record.state.pid, "pid")
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespaces.ns_id(int(entry), "pid") == want:
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            out.append((int(entry), str(uid), cmd))
    return sorted(out)
