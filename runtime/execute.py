"""`exec`: run another process in a running container -- its namespaces joined by
setns, its cgroup, its confinement (confine), its user, environment and working
directory unless -u, -e or -w say otherwise -- attached to the caller like the
monitor's first process (attach.Session)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from common.errors import StrataError
from runtime import namespaces, process
from runtime.attach import Session
from runtime.confine import process_spec
from runtime.containers import Container


def execute(c: Container, argv: list[str], env: Sequence[str] = (), workdir: str | None = None,
            user: str | None = None, tty: bool = False, interactive: bool = False) -> int:
    """Run argv inside c, attached; returns its exit code."""
    if not c.status().can_exec():
        raise StrataError(f"container {c.name} is not running")
    spec = process_spec(c, argv, tty, env, workdir, user)
    st = c.record.state
    fds: dict[str, int] = {}
    try:
        for name in namespaces.NAMESPACES:
            fds[name] = os.open(f"/proc/{st.pid}/ns/{name}", os.O_RDONLY)
        if not process.alive(st.pid, st.start_time):  # the namespaces are a recycled pid's
            raise StrataError(f"container {c.name} is not running")

        def enter() -> None:
            for name, fd in fds.items():
                namespaces.setns(fd, namespaces.NAMESPACES[name])

        session = Session.spawn(spec, enter, outside=c.cgroup().add, stdin=interactive)
    finally:
        for fd in fds.values():
            os.close(fd)
    return session.serve(linger=0.2)
