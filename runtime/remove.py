"""`rm`: remove a container. One that has a process needs --force, which kills it
first (thawed if paused, or SIGKILL would wait for the thaw); then it is torn down
and deleted. A --rm container that removed itself as it exited is already gone."""

from __future__ import annotations

import contextlib
import os
import signal

from common.errors import StrataError
from runtime.containers import Container
from runtime.record import Status
from runtime.stop import wait
from runtime.teardown import delete, teardown


def remove(c: Container, force: bool) -> None:
    status = c.status()
    if not status.can_remove():
        if not force:
            raise StrataError(f"container {c.name} is running: stop it first or use --force")
        if status is Status.PAUSED:
            c.cgroup().thaw()
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.record.state.pid, signal.SIGKILL)
        wait(c)
    if not c.dir.exists():
        return
    with c.locked():
        problems = teardown(c)
    if problems:
        raise StrataError(f"could not remove {c.name}: {'; '.join(problems)}")
    delete(c)
