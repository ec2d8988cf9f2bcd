"""`start`: run a container under its monitor. Attached (`run` without -d, `start
-a`), the CLI itself is the monitor and returns the exit code; detached, the
monitor is a daemon (common.daemon) and `start` returns once the process has
exec'd, or raises the reason it could not.

The monitor sets the container up (prepare), starts its first process in new
namespaces (attach.Session, as exec does), publishes its ports, records it
running, then carries its output to the log until it exits, records the exit
and undoes everything (teardown.finish). If a monitor is killed, `wait`,
`prune` or `rm` finish the container the same way."""

from __future__ import annotations

import os
import socket

from common import daemon
from common.errors import StrataError
from runtime import namespaces, network, process, record, rootfs
from runtime.attach import LogWriter, Session
from runtime.confine import container_devices, process_spec
from runtime.containers import Container
from runtime.prepare import prepare
from runtime.record import Status
from runtime.teardown import finish

# Every container gets its own mount, PID, UTS and IPC namespaces (and network, unless shared).
NAMESPACES = (namespaces.CLONE_NEWNS | namespaces.CLONE_NEWPID | namespaces.CLONE_NEWUTS
              | namespaces.CLONE_NEWIPC)


def start(c: Container, attach: bool) -> int:
    """Run c: attached, the caller is the monitor and gets the exit code; detached, a
    daemon monitors it and this returns 0 once the process has exec'd."""
    with c.locked():
        status = c.status()
        if not status.can_start():
            raise StrataError(f"container {c.name} is already running")
        if status is Status.EXITED and c.record.state.status is not Status.EXITED:
            finish(c, None)  # a monitor died: clean up before the restart
            c.reload()  # (gone, if it was a --rm container)
        _record_monitor(c, Status.STARTING)
    if attach:
        return _monitor(c, attached=True)

    def monitor(notify: daemon.Notifier) -> int:
        daemon.quiet()
        _record_monitor(c)
        _monitor(c, attached=False, notify=notify)
        return 0

    daemon.daemonize(monitor, name="container monitor", double_fork=True)
    return 0


def _record_monitor(c: Container, status: Status | None = None) -> None:
    """This process looks after c from now on (and, given a status, c is in it afresh)."""
    with c.editing() as rec:
        if status is not None:
            rec.state.status, rec.state.error = status, ""
        rec.state.monitor_pid, rec.state.monitor_start_time = os.getpid(), process.start_time(os.getpid())


def _monitor(c: Container, attached: bool, notify: daemon.Notifier | None = None) -> int:
    try:
        session = _launch(c, attached)
    except BaseException as e:
        finish(c, None, error=str(e) or type(e).__name__)
        raise
    if notify is not None:
        notify.ready()
    log = LogWriter(c.log_path)
    code = session.serve(log, attached=attached)
    log.close()
    finish(c, code)
    return code


def _launch(c: Container, attached: bool) -> Session:
    """Set c up, start its process and publish its ports; recorded as running."""
    cfg, hc = c.record.config, c.record.host_config
    devs = container_devices(c)
    binds = prepare(c, devs)
    spec = process_spec(c, c.record.argv, cfg.tty)
    flags = NAMESPACES
    join_net: int | None = None
    if hc.network_mode in ("none", "bridge"):
        flags |= namespaces.CLONE_NEWNET
    elif hc.network_owner is not None:
        owner = c.rt.get(hc.network_owner)
        if owner.status() is not Status.RUNNING:
            raise StrataError(f"cannot join the network of {owner.name}: it is not running")
        join_net = os.open(f"/proc/{owner.record.state.pid}/ns/net", os.O_RDONLY)
    cg = c.cgroup()
    ip = c.record.network.ip_address or None

    def enter() -> None:
        if join_net is not None:
            namespaces.setns(join_net, namespaces.CLONE_NEWNET)
        namespaces.unshare(flags)

    def outside(helper: int) -> None:
        cg.add(helper)
        if hc.network_mode == "bridge":
            network.move_peer(c.id, helper)

    def setup(console: str | None) -> None:
        if flags & namespaces.CLONE_NEWNET:
            network.configure_inside(c.id if hc.network_mode == "bridge" else None, ip)
        socket.sethostname(cfg.hostname)
        rootfs.enter(c.record.layers.merged, binds, console, devs, hc.privileged)

    sockets = network.listen(hc.port_bindings)
    try:
        session = Session.spawn(spec, enter, setup, outside, stdin=attached and cfg.open_stdin,
                                keep_stdin_open=not attached and cfg.open_stdin)
    except BaseException:
        for s in sockets:
            s.close()
        raise
    finally:
        if join_net is not None:
            os.close(join_net)
    if sockets and ip:
        network.proxy(sockets, hc.port_bindings, ip)
    pid = session.spawned.pid
    with c.editing() as rec:
        rec.state.status, rec.state.pid, rec.state.start_time = Status.RUNNING, pid, process.start_time(pid)
        rec.state.started_at, rec.state.finished_at, rec.state.exit_code = record.timestamp(), "", 0
    return session
