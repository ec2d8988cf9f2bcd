"""Undoing a run: `teardown` takes down everything the monitor set up outside the
process (the process itself if it is still there, cgroup, veth, volumes, the
rootfs mount), `finish` records the end and tears down, `delete` removes the
container for good. Each is idempotent and works from the record alone, so the
monitor at a normal exit, `wait` and `prune` after a monitor died, and `rm` all
undo a run the same way."""

from __future__ import annotations

import contextlib
import os
import signal

from common.errors import StrataError
from common.tree import remove_path
from runtime import mounts, network, process, record
from runtime.containers import Container
from runtime.record import Status
from unionfs import client


def teardown(c: Container) -> list[str]:
    """Kill what is left, remove cgroup and veth, release volumes, unmount the rootfs.
    Returns what could not be undone."""
    problems: list[str] = []
    st = c.record.state
    if st.pid and process.alive(st.pid, st.start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(st.pid, signal.SIGKILL)
    try:
        c.cgroup().destroy()
    except (StrataError, OSError) as e:
        problems.append(f"cgroup: {e}")
    if c.record.host_config.network_mode == "bridge":
        network.remove_veth(c.id)
    for i in st.attached_mounts or []:
        try:
            mounts.detach(c.record.mounts[i], c.id, c.rt.root_arg)
        except StrataError as e:
            problems.append(f"volume: {e}")
    with c.editing() as rec:
        rec.state.attached_mounts = []
    try:
        client.unmount(c.record.layers.merged)
    except StrataError as e:
        problems.append(str(e))
    return problems


def finish(c: Container, code: int | None, error: str = "") -> None:
    """Record the end (code None: unknown, the monitor died), undo everything, and
    delete the container if it was run with --rm."""
    oom = c.cgroup().oom_killed() if c.cgroup().exists() else False
    problems = teardown(c)
    if error or problems:
        error = "; ".join([error, *problems]).strip("; ")
    with c.editing() as rec:
        rec.state.status = Status.EXITED
        rec.state.pid = 0
        rec.state.monitor_pid = 0
        rec.state.exit_code = 255 if code is None else code
        rec.state.finished_at = record.timestamp()
        rec.state.oom_killed = oom
        rec.state.error = error
        rec.network.ip_address = rec.network.gateway = ""
    if c.record.host_config.auto_remove:
        delete(c)


def delete(c: Container) -> None:
    """Remove c's directory and let go of its image; c must be torn down."""
    doomed = c.rt.containers_dir / f".rm-{c.id}"
    os.rename(c.dir, doomed)
    c.rt.store.release(c.id)
    remove_path(doomed)  # a leftover (a failure here) is swept by prune
