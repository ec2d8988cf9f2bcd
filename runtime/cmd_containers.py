"""Container commands, docker's verbs and flags: create, start, run, ps, logs, exec,
stop, kill, rm, wait, inspect, diff, commit, export, top, pause, unpause, and
`strata system prune`. Thin: parsing and presentation here, the work in the
runtime's verb modules (create, monitor, execute, stop, pause, remove, layer,
inspection, prune) over runtime.containers."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from common.errors import StrataError
from common.parsing import parse_size
from runtime import inspection, layer, pause, prune, remove, stop
from runtime.attach import read_log
from runtime.commands import Command
from runtime.containers import Container, Runtime
from runtime.create import STORAGE_DRIVERS, RunOptions, create
from runtime.execute import execute
from runtime.monitor import start
from runtime.output import print_json, print_table
from runtime.process import StartError
from runtime.record import Status


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise StrataError(f"invalid signal {text!r}") from None


def _rt(args: argparse.Namespace) -> Runtime:
    return Runtime(args.root)


def _options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        image=args.image, command=args.command, name=args.name, env=args.env, workdir=args.workdir,
        user=args.user, hostname=args.hostname, entrypoint=args.entrypoint, tty=args.tty,
        interactive=args.interactive, auto_remove=args.rm, volumes=args.volume,
        volumes_from=args.volumes_from, volume_driver=args.volume_driver,
        memory=parse_size(args.memory, "memory") if args.memory else None, cpus=args.cpus,
        pids_limit=args.pids_limit, network=args.network, publish=args.publish, dns=args.dns,
        add_hosts=args.add_host, storage_driver=args.storage_driver, privileged=args.privileged,
        cap_add=args.cap_add, cap_drop=args.cap_drop, devices=args.device, security_opt=args.security_opt,
    )


def cmd_create(args: argparse.Namespace) -> int:
    print(create(_rt(args), _options(args)).id)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    c = create(_rt(args), _options(args))
    if args.detach:
        start(c, attach=False)
        print(c.id)
        return 0
    try:
        return start(c, attach=True)
    except StartError as e:
        print(f"strata: {e}", file=sys.stderr)
        return e.code


def cmd_start(args: argparse.Namespace) -> int:
    rt = _rt(args)
    code = 0
    for ref in args.containers:
        c = rt.get(ref)
        if args.attach:
            code = start(c, attach=True)
        else:
            start(c, attach=False)
            print(ref)
    return code


def _status_text(c: Container, status: Status) -> str:
    st = c.record.state
    if status.is_up():
        text = f"Up {_ago(st.started_at)}"
        return text + " (Paused)" if status is Status.PAUSED else text
    if status is Status.EXITED:
        return f"Exited ({st.exit_code}) {_ago(st.finished_at)} ago" if st.finished_at else "Exited"
    return status.capitalize()


def _ago(when: str) -> str:
    try:
        t = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return ""
    secs = int((datetime.datetime.now(datetime.UTC) - t).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = secs // size
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return f"{secs} seconds"


def _command(c: Container) -> str:
    text = " ".join(c.record.argv)
    return json.dumps(text if len(text) <= 30 else text[:29] + "…", ensure_ascii=False)


def cmd_ps(args: argparse.Namespace) -> int:
    rows = []
    for c in _rt(args).all():
        status = c.status()
        if not args.all and not status.is_up():
            continue
        ports = ", ".join(f"127.0.0.1:{p.host}->{p.container}/tcp"
                          for p in c.record.host_config.port_bindings)
        rows.append({"ID": c.id, "Image": c.record.config.image, "Command": _command(c),
                     "Created": c.record.created, "State": str(status), "Status": _status_text(c, status),
                     "Ports": ports, "Names": c.name, "IPAddress": c.record.network.ip_address})
    if args.quiet:
        for r in rows:
            print(r["ID"][:12])
    elif args.format == "json":
        print_json(rows)
    else:
        print_table(["CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "PORTS", "NAMES"],
                    [[r["ID"][:12], r["Image"], r["Command"], r["Status"], r["Ports"], r["Names"]]
                     for r in rows])
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    rt = _rt(args)
    c = rt.get(args.container)

    def running() -> bool:
        return c.reload().status().is_monitored()

    for stream, data in read_log(c.log_path, running if args.follow else None):
        out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        out.write(data)
        out.flush()
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    c = _rt(args).get(args.container)
    return execute(c, [args.cmd, *args.args], env=args.env, workdir=args.workdir, user=args.user,
                   tty=args.tty, interactive=args.interactive)


def _each(args: argparse.Namespace, verb: str, action: Callable[[Container], None]) -> int:
    """Apply action to every container named, docker style: report failures, go on."""
    rt = _rt(args)
    failed = False
    for ref in args.containers:
        try:
            action(rt.get(ref))
            print(ref)
        except StrataError as e:
            print(f"strata: {verb} {ref}: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def cmd_stop(args: argparse.Namespace) -> int:
    return _each(args, "stop", lambda c: stop.stop(c, args.time))


def cmd_kill(args: argparse.Namespace) -> int:
    sig = parse_signal(args.signal)
    return _each(args, "kill", lambda c: stop.kill(c, sig))


def cmd_rm(args: argparse.Namespace) -> int:
    return _each(args, "rm", lambda c: remove.remove(c, args.force))


def cmd_pause(args: argparse.Namespace) -> int:
    return _each(args, "pause", pause.pause)


def cmd_unpause(args: argparse.Namespace) -> int:
    return _each(args, "unpause", pause.unpause)


def cmd_wait(args: argparse.Namespace) -> int:
    rt = _rt(args)
    for ref in args.containers:
        print(stop.wait(rt.get(ref)))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    rt = _rt(args)
    print_json([inspection.inspect(rt.get(ref)) for ref in args.containers])
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    for kind, path in layer.diff(_rt(args).get(args.container)):
        print(f"{kind} {path}")
    return 0


def _changes(items: list[str]) -> dict[str, Any]:
    """--change 'CMD ["x"]' / 'ENV K=V' / 'WORKDIR /d' / 'USER u' / 'ENTRYPOINT [...]'."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.strip().partition(" ")
        key = key.upper()
        if key in ("CMD", "ENTRYPOINT"):
            try:
                parsed = json.loads(value) if value.strip().startswith("[") else ["/bin/sh", "-c", value]
            except ValueError:
                raise StrataError(f"invalid --change {item!r}: bad JSON") from None
            out["Cmd" if key == "CMD" else "Entrypoint"] = parsed
        elif key == "ENV" and "=" in value:
            out.setdefault("Env", []).append(value.strip())
        elif key in ("WORKDIR", "USER"):
            out["WorkingDir" if key == "WORKDIR" else "User"] = value.strip()
        else:
            raise StrataError(f"invalid --change {item!r}: CMD, ENTRYPOINT, ENV, WORKDIR or USER")
    return out


def cmd_commit(args: argparse.Namespace) -> int:
    c = _rt(args).get(args.container)
    changes = _changes(args.change)
    if "Env" in changes:
        keys = {e.split("=", 1)[0] for e in changes["Env"]}
        kept = [e for e in c.record.config.env if e.split("=", 1)[0] not in keys]
        changes["Env"] = kept + changes["Env"]
    print(layer.commit(c, args.reference, args.message, args.author, changes, pause=args.pause == "true"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    c = _rt(args).get(args.container)
    if args.output:
        tmp = f"{args.output}.part"
        with open(tmp, "wb") as f:
            layer.export(c, f)
        os.rename(tmp, args.output)
    else:
        if sys.stdout.isatty():
            raise StrataError("refusing to write a tar to a terminal: use -o FILE or redirect")
        layer.export(c, sys.stdout.buffer)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    print_table(["PID", "UID", "CMD"], inspection.top(_rt(args).get(args.container)))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    for line in prune.prune(_rt(args)):
        print(line)
    return 0


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="container name")
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set an environment variable")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="user[:group], names or ids from the image's /etc/passwd")
    p.add_argument("-h", "--hostname", help="container host name")
    p.add_argument("--entrypoint", help="override the image's entrypoint")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:/path[:ro]",
                   help="named volume (created on first use) or host path")
    p.add_argument("--volumes-from", action="append", default=[], metavar="CONTAINER[:ro|rw]",
                   help="mount the volumes of another container")
    p.add_argument("--volume-driver", help="Docker volume plugin for named volumes (default: strata's own)")
    p.add_argument("-m", "--memory", help="memory limit (e.g. 64m)")
    p.add_argument("--cpus", type=float, help="number of CPUs")
    p.add_argument("--pids-limit", type=int, help="maximum number of processes")
    p.add_argument("--network", "--net", default="bridge",
                   help="none, host, bridge (default) or container:NAME")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="HOST:CONTAINER",
                   help="publish a container port on 127.0.0.1")
    p.add_argument("--dns", action="append", default=[], help="DNS server for /etc/resolv.conf")
    p.add_argument("--add-host", action="append", default=[], metavar="HOST:IP",
                   help="add a line to /etc/hosts")
    p.add_argument("--storage-driver", default=STORAGE_DRIVERS[0], choices=list(STORAGE_DRIVERS),
                   help="rootfs through strata-unionfs (default) or the kernel's overlayfs")
    p.add_argument("--privileged", action="store_true",
                   help="all capabilities and host devices, no seccomp, no masked or read-only paths")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                   help="add a capability to docker's default set (ALL for every one)")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP",
                   help="drop a capability (ALL for every one)")
    p.add_argument("--device", action="append", default=[], metavar="/dev/x[:/dev/y][:rwm]",
                   help="give the container a host device")
    p.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                   help="seccomp=unconfined, seccomp=PROFILE.json or no-new-privileges")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)


def _containers(p: argparse.ArgumentParser) -> None:
    p.add_argument("containers", nargs="+", metavar="CONTAINER")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--detach", action="store_true", help="run in the background, print the id")
    _run_flags(p)


def _start_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--attach", action="store_true", help="attach output and wait for the exit")
    _containers(p)


def _ps_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="also stopped ones")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.add_argument("--format", choices=["table", "json"], default="table")


def _logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--follow", action="store_true", help="keep following while it runs")
    p.add_argument("container")


def _exec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-w", "--workdir")
    p.add_argument("-u", "--user")
    p.add_argument("container")
    p.add_argument("cmd")
    p.add_argument("args", nargs=argparse.REMAINDER)


def _stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--time", type=float, default=10, help="seconds before SIGKILL (default 10)")
    _containers(p)


def _kill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--signal", default="KILL")
    _containers(p)


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--force", action="store_true", help="kill running ones first")
    _containers(p)


def _container(p: argparse.ArgumentParser) -> None:
    p.add_argument("container")


def _commit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--message", default="")
    p.add_argument("-a", "--author", default="")
    p.add_argument("-c", "--change", action="append", default=[],
                   help="CMD, ENTRYPOINT, ENV, WORKDIR or USER")
    p.add_argument("-p", "--pause", default="true", choices=["true", "false"],
                   help="freeze a running container while its layer is read (default true, as docker)")
    p.add_argument("container")
    p.add_argument("reference", nargs="?")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="file (default stdout)")
    p.add_argument("container")


COMMANDS = [
    Command(("create",), "create a container", cmd_create, _run_flags, add_help=False),
    Command(("run",), "create and start a container", cmd_run, _run_arguments, add_help=False),
    Command(("start",), "start created or stopped containers", cmd_start, _start_arguments),
    Command(("ps",), "list containers", cmd_ps, _ps_arguments),
    Command(("logs",), "show a container's output", cmd_logs, _logs_arguments),
    Command(("exec",), "run a command in a running container", cmd_exec, _exec_arguments),
    Command(("stop",), "stop containers: SIGTERM, then SIGKILL after the timeout", cmd_stop, _stop_arguments),
    Command(("kill",), "send a signal to containers", cmd_kill, _kill_arguments),
    Command(("rm",), "remove containers", cmd_rm, _rm_arguments),
    Command(("wait",), "wait for containers to exit, print their exit codes", cmd_wait, _containers),
    Command(("inspect",), "show containers in detail (JSON)", cmd_inspect, _containers),
    Command(("pause",), "freeze every process of containers", cmd_pause, _containers),
    Command(("unpause",), "thaw paused containers", cmd_unpause, _containers),
    Command(("diff",), "files changed in a container's layer (A added, C changed, D deleted)", cmd_diff,
            _container),
    Command(("commit",), "create an image from a container's changes", cmd_commit, _commit_arguments),
    Command(("export",), "write a container's filesystem as a tar", cmd_export, _export_arguments),
    Command(("top",), "processes running in a container", cmd_top, _container),
    Command(("system", "prune"), "clean up what crashed strata processes left behind "
            "(containers whose monitor died, mounts, veths, cgroups)", cmd_prune, description=""),
]
