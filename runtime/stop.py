"""Ending a running container: `kill` (a signal), `stop` (SIGTERM, then SIGKILL after
a timeout) and `wait` (until its end is recorded). A paused container is thawed
where a signal must reach it. Its monitor records the exit; `wait` finishes a
container whose monitor died instead (teardown)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from common.errors import StrataError
from runtime.containers import Container
from runtime.record import Status
from runtime.teardown import finish


def kill(c: Container, sig: int) -> None:
    if not c.status().can_kill():
        raise StrataError(f"container {c.name} is not running")
    os.kill(c.record.state.pid, sig)
    if sig == signal.SIGKILL and c.status() is Status.PAUSED:
        c.cgroup().thaw()


def wait(c: Container, timeout: float | None = None) -> int:
    """Its exit code once the monitor has recorded the exit; a dead monitor's container
    is finished here (255). TimeoutError after timeout seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        c.reload()
        if c.record.state.status in (Status.CREATED, Status.EXITED):
            return c.record.state.exit_code
        if not c.monitor_alive() and not c.process_alive():
            finish(c, None, error="the container's monitor died")
            return 255
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def stop(c: Container, timeout: float) -> None:
    """SIGTERM, then SIGKILL once timeout seconds have passed; nothing for a container
    without a process."""
    status = c.status()
    if not status.can_stop():
        return
    if status is Status.PAUSED:
        c.cgroup().thaw()
    with contextlib.suppress(ProcessLookupError):
        os.kill(c.record.state.pid, signal.SIGTERM)
    try:
        wait(c, timeout)
        return
    except TimeoutError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(c.record.state.pid, signal.SIGKILL)
    wait(c)
