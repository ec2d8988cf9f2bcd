"""Containers: their records and their lifecycle.

On disk, under `<state root>/containers/<id>/`:

    container.json   the record, docker-inspect shaped (Config, HostConfig, Mounts,
                     State, NetworkSettings, GraphDriver); replaced atomically
    init/            the init layer: mount points the runtime owns (/proc, /dev, /sys,
                     /etc/hosts...), a lowerdir above the image so they never land in
                     the container's own layer
    upper/, work/    the container's layer (what `diff` and `commit` read)
    merged/          where its root is mounted while it runs
    hostname, hosts, resolv.conf, container.log

A container runs under a monitor: the CLI itself when attached (`run` without -d),
a daemon otherwise. The monitor mounts the rootfs and volumes, makes the cgroup and
the veth, starts the process, logs its output, and on exit records the status and
undoes all of it (`teardown`). If a monitor is killed, `system prune` (or `rm`)
finds what it left and undoes it the same way."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from common import dirwalk
from common.errors import StrataError
from common.kernel import MNT_DETACH, is_mountpoint, mount, umount
from common.paths import private_dir, state_root
from common.tree import remove_path
from images.archive import produce_layer
from images.store import Store
from runtime import capabilities, cgroups, devices, mounts, namespaces, network, process, rootfs, seccomp

NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
STORAGE_DRIVERS = ("strata-unionfs", "overlay")
INIT_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")
INIT_DIRS = ("proc", "sys", "dev", "etc")
SECCOMP_PROFILE = "seccomp.json"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unionfs_program() -> str:
    prog = Path(sys.executable).with_name("strata-unionfs")
    found = str(prog) if prog.exists() else shutil.which("strata-unionfs")
    if not found:
        raise StrataError("strata-unionfs not found next to the running Python or on PATH")
    return found


@dataclass
class RunOptions:
    """What `create`/`run` were asked for, before the image fills in the rest."""

    image: str
    command: list[str] = field(default_factory=list)
    name: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    entrypoint: str | None = None
    tty: bool = False
    interactive: bool = False
    auto_remove: bool = False
    volumes: list[str] = field(default_factory=list)
    volumes_from: list[str] = field(default_factory=list)
    volume_driver: str | None = None
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    network: str = "bridge"
    publish: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    add_hosts: list[str] = field(default_factory=list)
    storage_driver: str = "strata-unionfs"
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)


def _security_opts(items: list[str]) -> tuple[str | None, bool]:
    """--security-opt as docker takes it: (seccomp=unconfined|FILE or None, no-new-privileges)."""
    profile: str | None = None
    nnp = False
    for item in items:
        key, _, value = item.partition("=" if "=" in item else ":")  # docker's old form: seccomp:FILE
        if key == "seccomp" and value:
            profile = value
        elif key == "no-new-privileges" and value in ("", "true", "false"):
            nnp = value != "false"
        else:
            raise StrataError(f"invalid --security-opt {item!r}: "
                              "seccomp=unconfined|FILE or no-new-privileges")
    return profile, nnp


class Container:
    def __init__(self, runtime: Runtime, record: dict[str, Any]) -> None:
        self.rt = runtime
        self.rec = record
        self._lock_depth = 0

    @property
    def id(self) -> str:
        return str(self.rec["Id"])

    @property
    def name(self) -> str:
        return str(self.rec["Name"]).lstrip("/")

    @property
    def dir(self) -> Path:
        return self.rt.containers_dir / self.id

    @property
    def state(self) -> dict[str, Any]:
        return dict(self.rec["State"])

    @property
    def mounts(self) -> list[mounts.Mount]:
        return [mounts.Mount.from_json(m) for m in self.rec["Mounts"]]

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    def cgroup(self) -> cgroups.Cgroup:
        return cgroups.cgroup(self.id, self.rec["HostConfig"]["Cgroup"])

    def process_alive(self) -> bool:
        st = self.state
        return bool(st.get("Pid")) and process.alive(st["Pid"], st.get("StartTime"))

    def monitor_alive(self) -> bool:
        st = self.state
        return bool(st.get("MonitorPid")) and process.alive(st["MonitorPid"], st.get("MonitorStartTime"))

    def status(self) -> str:
        """created, running, paused, exited -- what the kernel says, not only the record."""
        st = self.state
        if st["Status"] in ("running", "paused"):
            if not self.process_alive():
                return "exited"
            return "paused" if self.cgroup().frozen() else "running"
        return str(st["Status"])

    def reload(self) -> Container:
        self.rec = self.rt.read_record(self.id)
        return self

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The container's lock, re-entrant within this object (teardown updates the record)."""
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

    def update(self, **state: Any) -> None:
        """Change State fields atomically (under the container lock)."""
        with self.locked():
            self.rec["State"].update(state)
            self.rt.write_record(self.rec)

    def set(self, section: str, **values: Any) -> None:
        with self.locked():
            self.rec[section].update(values)
            self.rt.write_record(self.rec)


class Runtime:
    """All containers of a state root."""

    def __init__(self, root: str | None = None) -> None:
        # Absolute: a detached monitor leaves the caller's working directory.
        self.root = state_root(root).absolute()
        self.root_arg = str(self.root)
        self.containers_dir = self.root / "containers"
        self.store = Store(self.root_arg)
        private_dir(self.containers_dir)

    # --- records ---------------------------------------------------------------------

    def read_record(self, cid: str) -> dict[str, Any]:
        try:
            return dict(json.loads((self.containers_dir / cid / "container.json").read_text()))
        except FileNotFoundError:
            raise StrataError(f"no such container: {cid}") from None

    def write_record(self, rec: dict[str, Any]) -> None:
        path = self.containers_dir / rec["Id"] / "container.json"
        tmp = path.with_name(".container.json.tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.rename(tmp, path)

    def all(self) -> list[Container]:
        out = []
        for d in self.containers_dir.iterdir():
            if d.is_dir() and (d / "container.json").exists():
                with contextlib.suppress(StrataError, ValueError):
                    out.append(Container(self, self.read_record(d.name)))
        return sorted(out, key=lambda c: str(c.rec["Created"]), reverse=True)

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
    def _names_locked(self) -> Iterator[None]:
        with open(self.containers_dir / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield

    # --- create ----------------------------------------------------------------------

    def create(self, opts: RunOptions) -> Container:
        """A container record and its directories; the image is held until `rm`."""
        if opts.name is not None and not NAME_RE.match(opts.name):
            raise StrataError(f"invalid container name {opts.name!r}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*")
        if opts.storage_driver not in STORAGE_DRIVERS:
            raise StrataError(f"unknown storage driver {opts.storage_driver!r} (strata-unionfs or overlay)")
        net_mode = network.check_mode(opts.network)
        ports = [network.Port.parse(p) for p in opts.publish]
        if ports and net_mode != "bridge":
            raise StrataError("-p needs --network bridge")
        for e in opts.env:
            if not e or e.startswith("="):
                raise StrataError(f"invalid environment variable {e!r}")
        hosts = [self._parse_add_host(h) for h in opts.add_hosts]
        for d in opts.dns:
            try:
                socket.inet_pton(socket.AF_INET6 if ":" in d else socket.AF_INET, d)
            except OSError:
                raise StrataError(f"invalid --dns address {d!r}") from None
        if opts.memory is not None and opts.memory < 6 * 1024 * 1024:
            raise StrataError("minimum memory limit allowed is 6MB")
        if opts.cpus is not None and opts.cpus <= 0:
            raise StrataError("--cpus must be positive")
        if opts.pids_limit is not None and opts.pids_limit <= 0:
            raise StrataError("--pids-limit must be positive")
        capabilities.tweak(opts.cap_add, opts.cap_drop, opts.privileged)  # unknown names refused here
        device_list = [devices.parse(d) for d in opts.devices]
        profile_path, _ = _security_opts(opts.security_opt)
        profile = None
        if profile_path is not None and profile_path != "unconfined":
            profile = seccomp.load(profile_path)
            seccomp.build(profile, capabilities.DEFAULT)  # a bad profile is refused here
        mount_list = [mounts.parse(v, opts.volume_driver) for v in opts.volumes]
        for ref in opts.volumes_from:
            src_name, _, mode = ref.partition(":")
            src = self.get(src_name)
            mount_list += [mounts.with_mode(m, mode or None) for m in src.mounts]
        dests = [m.Destination for m in mount_list]
        dup = {d for d in dests if dests.count(d) > 1}
        if dup:
            raise StrataError(f"duplicate mount point: {sorted(dup)[0]}")
        if net_mode.startswith("container:"):
            self.get(net_mode.split(":", 1)[1])
        image_id = self.store.resolve(opts.image)
        image = self.store.image(image_id)
        cfg = image.config.get("config") or {}
        entrypoint = [opts.entrypoint] if opts.entrypoint is not None else list(cfg.get("Entrypoint") or [])
        if opts.entrypoint == "":
            entrypoint = []
        cmd = opts.command or ([] if opts.entrypoint is not None else list(cfg.get("Cmd") or []))
        argv = entrypoint + cmd
        if not argv:
            raise StrataError("no command specified (the image has no Entrypoint or Cmd)")
        cid = secrets.token_hex(32)
        env = list(cfg.get("Env") or [])
        for e in opts.env:
            if "=" not in e:  # -e NAME takes the value from our environment, as docker does
                if e not in os.environ:
                    continue
                e = f"{e}={os.environ[e]}"
            key = e.split("=", 1)[0]
            env = [x for x in env if x.split("=", 1)[0] != key] + [e]
        hostname = opts.hostname or cid[:12]
        record: dict[str, Any] = {
            "Id": cid,
            "Created": _now(),
            "Path": argv[0],
            "Args": argv[1:],
            "Image": image_id,
            "Config": {
                "Hostname": hostname,
                "User": opts.user if opts.user is not None else cfg.get("User", ""),
                "Env": env,
                "Cmd": cmd,
                "Entrypoint": entrypoint,
                "WorkingDir": opts.workdir or cfg.get("WorkingDir") or "/",
                "Tty": opts.tty,
                "OpenStdin": opts.interactive,
                "Image": opts.image,
            },
            "HostConfig": {
                "AutoRemove": opts.auto_remove,
                "Memory": opts.memory or 0,
                "NanoCpus": int((opts.cpus or 0) * 1e9),
                "PidsLimit": opts.pids_limit or 0,
                "NetworkMode": net_mode,
                "PortBindings": [[p.host, p.container] for p in ports],
                "Dns": opts.dns,
                "ExtraHosts": [f"{n}:{a}" for n, a in hosts],
                "VolumesFrom": opts.volumes_from,
                "VolumeDriver": opts.volume_driver or "",
                "Cgroup": cgroups.default_version(),
                "Privileged": opts.privileged,
                "CapAdd": opts.cap_add,
                "CapDrop": opts.cap_drop,
                "Devices": device_list,
                "SecurityOpt": opts.security_opt,
            },
            "Mounts": [m.to_json() for m in mount_list],
            "State": {"Status": "created", "Running": False, "Paused": False, "Pid": 0, "ExitCode": 0,
                      "Error": "", "StartedAt": "", "FinishedAt": "", "OOMKilled": False},
            "NetworkSettings": {"IPAddress": "", "Gateway": "", "Ports": {}},
            "GraphDriver": {"Name": opts.storage_driver, "Data": {}},
        }
        cdir = self.containers_dir / cid
        staging = self.containers_dir / f".new-{cid}"
        for d in ("init", "upper", "work", "merged"):
            (staging / d).mkdir(parents=True)
        for d in INIT_DIRS:
            (staging / "init" / d).mkdir(exist_ok=True)
        for f in INIT_FILES:
            (staging / "init" / f).touch()
        if profile is not None:  # docker too keeps the profile given at create, not the file
            (staging / SECCOMP_PROFILE).write_text(json.dumps(profile))
        record["GraphDriver"]["Data"] = {
            "LowerDir": ":".join(str(p) for p in [cdir / "init", *image.lowerdirs]),
            "UpperDir": str(cdir / "upper"), "WorkDir": str(cdir / "work"), "MergedDir": str(cdir / "merged"),
        }
        try:
            for m in mount_list:
                mounts.ensure(m, self.root_arg)
            with self._names_locked():
                taken = {c.name for c in self.all()}
                name = opts.name.lstrip("/") if opts.name else self._generate_name(taken, cid)
                if name in taken:
                    raise StrataError(f"the container name {name!r} is already in use")
                record["Name"] = "/" + name
                (staging / "container.json").write_text(json.dumps(record, indent=1))
                self.store.hold(cid, image_id)
                os.rename(staging, cdir)
        except BaseException:
            remove_path(staging)
            raise
        return Container(self, record)

    @staticmethod
    def _generate_name(taken: set[str], cid: str) -> str:
        words = ("amber", "brisk", "calm", "deft", "eager", "fond", "glad", "keen", "lucid", "merry")
        things = ("otter", "heron", "lynx", "finch", "ibex", "koala", "marten", "newt", "quail", "wren")
        for i in range(len(words) * len(things)):
            n = int(cid[i % 50:i % 50 + 8], 16) + i
            name = f"{words[n % len(words)]}_{things[(n // len(words)) % len(things)]}"
            if name not in taken:
                return name
        return f"strata_{cid[:12]}"

    @staticmethod
    def _parse_add_host(spec: str) -> tuple[str, str]:
        name, sep, addr = spec.partition(":")
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
        except OSError:
            addr = ""
        if not sep or not name or not addr:
            raise StrataError(f"invalid --add-host {spec!r}: expected HOST:IP")
        return name, addr

    # --- start: the monitor ----------------------------------------------------------

    def start(self, c: Container, attach: bool) -> int:
        """Run c: attached, the caller is the monitor and gets the exit code; detached, a
        daemon monitors it and this returns 0 once the process has exec'd."""
        with c.locked():
            status = c.status()
            if status in ("running", "paused"):
                raise StrataError(f"container {c.name} is already running")
            if status == "exited" and c.state["Status"] != "exited":
                self._finish(c, None)  # a monitor died: clean up before the restart
                c.reload()
            c.rec["State"].update(Status="starting", Error="", MonitorPid=os.getpid(),
                                  MonitorStartTime=process.start_time(os.getpid()))
            self.write_record(c.rec)
        if attach:
            return self._monitor(c, attach=True, notify=None)
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
                os.chdir("/")  # a daemon must not keep the caller's directory (or its mount) busy
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                c.update(MonitorPid=os.getpid(), MonitorStartTime=process.start_time(os.getpid()))
                self._monitor(c, attach=False, notify=w)
                os._exit(0)
            except BaseException as e:  # reported to the waiting CLI
                with contextlib.suppress(OSError):
                    os.write(w, f"E{e}".encode())
                os._exit(1)
        os.close(w)
        os.waitpid(pid, 0)
        answer = process._read_all(r).decode(errors="replace")
        os.close(r)
        if not answer.startswith("S"):
            raise StrataError(answer[1:] or "the container monitor died while starting")
        return 0

    def _monitor(self, c: Container, attach: bool, notify: int | None) -> int:
        hc = c.rec["HostConfig"]
        cfg = c.rec["Config"]
        stdio_close: list[int] = []
        try:
            devs = self._devices(c)
            binds = self._prepare(c, devs)
            stdio, stdio_close, outputs, stdin_w = process.make_stdio(
                cfg["Tty"], attach and cfg["OpenStdin"], keep_stdin_open=not attach and cfg["OpenStdin"])
            spec = process.ProcessSpec(
                [c.rec["Path"], *c.rec["Args"]], cfg["Env"] + [f"HOSTNAME={cfg['Hostname']}"],
                cfg["WorkingDir"], cfg["User"], cfg["Tty"])
            self._confine(c, spec)
            privileged = bool(hc.get("Privileged"))
            net_mode = hc["NetworkMode"]
            flags = namespaces.CLONE_NEWNS | namespaces.CLONE_NEWPID | namespaces.CLONE_NEWUTS | \
                namespaces.CLONE_NEWIPC
            join_net: int | None = None
            if net_mode in ("none", "bridge"):
                flags |= namespaces.CLONE_NEWNET
            elif net_mode.startswith("container:"):
                other = self.get(net_mode.split(":", 1)[1])
                if other.status() != "running":
                    raise StrataError(f"cannot join the network of {other.name}: it is not running")
                join_net = os.open(f"/proc/{other.state['Pid']}/ns/net", os.O_RDONLY)
            cg = c.cgroup()
            ip = c.rec["NetworkSettings"]["IPAddress"] or None
            merged = str(c.dir / "merged")
            console = os.ttyname(stdio[0]) if cfg["Tty"] else None

            def enter() -> None:
                if join_net is not None:
                    namespaces.setns(join_net, namespaces.CLONE_NEWNET)
                namespaces.unshare(flags)

            def outside(helper: int) -> None:
                cg.add(helper)
                if net_mode == "bridge":
                    network.move_peer(c.id, helper)

            def setup() -> None:
                if flags & namespaces.CLONE_NEWNET:
                    network.configure_inside(c.id if net_mode == "bridge" else None, ip)
                socket.sethostname(cfg["Hostname"])
                rootfs.enter(merged, binds, console, devs, privileged)

            sockets = network.listen([network.Port(h, p) for h, p in hc["PortBindings"]])
            try:
                spawned = process.spawn(spec, stdio, enter, setup, outside)
            except BaseException:
                for s in sockets:
                    s.close()
                raise
            finally:
                if join_net is not None:
                    os.close(join_net)
                for fd in stdio_close:
                    os.close(fd)
                stdio_close = []
            if sockets and ip:
                network.proxy(sockets, [network.Port(h, p) for h, p in hc["PortBindings"]], ip)
            c.update(Status="running", Running=True, Pid=spawned.pid,
                     StartTime=process.start_time(spawned.pid), StartedAt=_now(), FinishedAt="", ExitCode=0)
        except BaseException as e:
            for fd in stdio_close:
                os.close(fd)
            self._finish(c, None, error=str(e) or type(e).__name__)
            raise
        if notify is not None:
            os.write(notify, b"S")
            os.close(notify)
        log = process.LogWriter(c.log_path)
        pump = process.Pump(log=log, attached=attach)
        for fd, stream in outputs.items():
            pump.add_output(fd, stream)
        if stdin_w is not None and attach:
            pump.add_input(sys.stdin.fileno(), stdin_w, close_dst=not cfg["Tty"])
        if attach and not cfg["Tty"]:
            process.forward_signals(spawned.pid)
        with process.raw_terminal(attach and cfg["Tty"]):
            code = pump.run(spawned.helper)
        log.close()
        self._finish(c, code)
        return code

    @staticmethod
    def _devices(c: Container) -> tuple[devices.Device, ...]:
        """The --device nodes (looked up now: a node's numbers may have changed since
        create), and with --privileged every device of the host, as docker gives them."""
        hc = c.rec["HostConfig"]
        found = [devices.resolve(d["PathOnHost"], d["PathInContainer"], d["CgroupPermissions"])
                 for d in hc.get("Devices", [])]
        return tuple(devices.host_devices() + found if hc.get("Privileged") else found)

    @staticmethod
    def _confine(c: Container, spec: process.ProcessSpec) -> None:
        """Capabilities, seccomp filter and no_new_privs from the container's HostConfig,
        for its first process and for every exec."""
        hc = c.rec["HostConfig"]
        privileged = bool(hc.get("Privileged"))
        spec.caps = capabilities.tweak(hc.get("CapAdd", []), hc.get("CapDrop", []), privileged)
        profile, spec.no_new_privs = _security_opts(hc.get("SecurityOpt", []))
        if privileged or profile == "unconfined":
            return
        spec.seccomp = seccomp.build(seccomp.load(c.dir / SECCOMP_PROFILE) if profile
                                     else seccomp.default_profile(), spec.caps)

    def _prepare(self, c: Container, devs: tuple[devices.Device, ...]) -> list[rootfs.Bind]:
        """Everything outside the process: rootfs mount, volumes, cgroup (with its device
        rules), veth, /etc files. Each step is recorded before it is done, so teardown
        knows what to undo."""
        hc, cfg = c.rec["HostConfig"], c.rec["Config"]
        data = c.rec["GraphDriver"]["Data"]
        self._mount_rootfs(c.rec["GraphDriver"]["Name"], data)
        binds: list[rootfs.Bind] = []
        attached: list[int] = []
        for i, m in enumerate(c.mounts):
            attached.append(i)
            c.update(AttachedMounts=attached)
            host_path = mounts.attach(m, c.id, self.root_arg)
            if m.Type == "volume":
                mounts.copy_image_content(rootfs.secure_join(data["MergedDir"], m.Destination), host_path)
            binds.append(rootfs.Bind(host_path, m.Destination, not m.RW))
        limits = cgroups.Limits(hc["Memory"] or None, hc["NanoCpus"] / 1e9 or None, hc["PidsLimit"] or None)
        c.cgroup().create(limits)
        if not hc.get("Privileged"):
            c.cgroup().allow_devices([*devices.DEFAULT_RULES, *(d.rule() for d in devs)])
        ip = ""
        if hc["NetworkMode"] == "bridge":
            ip = network.allocate(self.containers_dir / ".network.lock", self._ips_in_use,
                                  lambda addr: c.set("NetworkSettings", IPAddress=addr,
                                                     Gateway=str(network.GATEWAY)))
            network.create_veth(c.id)
            c.set("NetworkSettings", Ports={f"{p}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(h)}]
                                            for h, p in hc["PortBindings"]})
        elif hc["NetworkMode"].startswith("container:"):
            ip = self.get(hc["NetworkMode"].split(":", 1)[1]).rec["NetworkSettings"]["IPAddress"]
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if ip:
            hosts.append(f"{ip}\t{cfg['Hostname']}")
        hosts += [f"{a}\t{n}" for n, a in (h.split(":", 1) for h in hc["ExtraHosts"])]
        (c.dir / "hosts").write_text("\n".join(hosts) + "\n")
        (c.dir / "hostname").write_text(cfg["Hostname"] + "\n")
        if hc["Dns"]:
            resolv = "".join(f"nameserver {d}\n" for d in hc["Dns"])
        else:
            try:
                resolv = Path("/etc/resolv.conf").read_text()
            except OSError:
                resolv = ""
        (c.dir / "resolv.conf").write_text(resolv)
        files = [rootfs.Bind(str(c.dir / Path(f).name), "/" + f) for f in INIT_FILES]
        return files + binds

    def _ips_in_use(self) -> list[str]:
        active = ("starting", "running", "paused")
        return [c.rec["NetworkSettings"]["IPAddress"] for c in self.all()
                if c.rec["NetworkSettings"]["IPAddress"] and c.state["Status"] in active]

    @staticmethod
    def _mount_rootfs(driver: str, data: dict[str, str]) -> None:
        merged = data["MergedDir"]
        if is_mountpoint(merged):
            return
        opts = f"lowerdir={data['LowerDir']},upperdir={data['UpperDir']},workdir={data['WorkDir']}"
        if driver == "overlay":
            try:
                mount("overlay", merged, "overlay", 0, opts)
            except OSError as e:
                raise StrataError(f"kernel overlayfs: {e}") from None
            return
        res = subprocess.run([unionfs_program(), "-o", opts, merged], capture_output=True, text=True)
        if res.returncode != 0:
            raise StrataError(f"mounting the rootfs: {res.stderr.strip() or res.returncode}")

    # --- finishing and teardown --------------------------------------------------------

    def _finish(self, c: Container, code: int | None, error: str = "") -> None:
        """Record the end (code None: unknown, the monitor died) and undo everything."""
        oom = c.cgroup().oom_killed() if c.cgroup().exists() else False
        problems = self.teardown(c)
        if error or problems:
            error = "; ".join([error, *problems]).strip("; ")
        c.update(Status="exited", Running=False, Paused=False, Pid=0, MonitorPid=0,
                 ExitCode=255 if code is None else code, FinishedAt=_now(), OOMKilled=oom, Error=error)
        c.set("NetworkSettings", IPAddress="", Gateway="")
        if c.rec["HostConfig"]["AutoRemove"]:
            self._delete(c)

    def teardown(self, c: Container) -> list[str]:
        """Kill what is left, remove cgroup and veth, release volumes, unmount the rootfs.
        Idempotent; returns what could not be undone."""
        problems: list[str] = []
        st = c.state
        if st.get("Pid") and process.alive(st["Pid"], st.get("StartTime")):
            with contextlib.suppress(ProcessLookupError):
                os.kill(st["Pid"], signal.SIGKILL)
        try:
            c.cgroup().destroy()
        except (StrataError, OSError) as e:
            problems.append(f"cgroup: {e}")
        if c.rec["HostConfig"]["NetworkMode"] == "bridge":
            network.remove_veth(c.id)
        for i in st.get("AttachedMounts") or []:
            try:
                mounts.detach(c.mounts[i], c.id, self.root_arg)
            except StrataError as e:
                problems.append(f"volume: {e}")
        c.update(AttachedMounts=[])
        merged = c.rec["GraphDriver"]["Data"].get("MergedDir")
        if merged:
            problems += unmount_rootfs(merged)
        return problems

    def _delete(self, c: Container) -> None:
        doomed = self.containers_dir / f".rm-{c.id}"
        os.rename(c.dir, doomed)
        self.store.release(c.id)
        remove_path(doomed)  # a leftover (a failure here) is swept by prune

    # --- verbs on running containers ---------------------------------------------------

    def kill(self, c: Container, sig: int) -> None:
        if c.status() not in ("running", "paused"):
            raise StrataError(f"container {c.name} is not running")
        os.kill(c.state["Pid"], sig)
        if sig == signal.SIGKILL and c.status() == "paused":
            c.cgroup().thaw()

    def wait(self, c: Container, timeout: float | None = None) -> int:
        """Until the monitor has recorded the exit; a dead monitor's container is finished here."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            c.reload()
            if c.state["Status"] in ("created", "exited"):
                return int(c.state["ExitCode"])
            if not c.monitor_alive() and not c.process_alive():
                self._finish(c, None, error="the container's monitor died")
                return 255
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.05)

    def stop(self, c: Container, timeout: float) -> None:
        """SIGTERM, then SIGKILL once timeout seconds have passed."""
        if c.status() not in ("running", "paused"):
            return
        if c.status() == "paused":
            c.cgroup().thaw()
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.state["Pid"], signal.SIGTERM)
        try:
            self.wait(c, timeout)
            return
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.kill(c.state["Pid"], signal.SIGKILL)
        self.wait(c)

    def remove(self, c: Container, force: bool) -> None:
        if c.status() in ("running", "paused"):
            if not force:
                raise StrataError(f"container {c.name} is running: stop it first or use --force")
            if c.status() == "paused":
                c.cgroup().thaw()
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.state["Pid"], signal.SIGKILL)
            self.wait(c)
        if not c.dir.exists():  # --rm removed it as it exited
            return
        with c.locked():
            problems = self.teardown(c)
        if problems:
            raise StrataError(f"could not remove {c.name}: {'; '.join(problems)}")
        self._delete(c)

    def pause(self, c: Container) -> None:
        if c.status() != "running":
            raise StrataError(f"container {c.name} is not running")
        c.cgroup().freeze()
        c.update(Paused=True)

    def unpause(self, c: Container) -> None:
        if c.status() != "paused":
            raise StrataError(f"container {c.name} is not paused")
        c.cgroup().thaw()
        c.update(Paused=False)

    def exec(self, c: Container, argv: list[str], opts: RunOptions) -> int:
        """Run argv inside c's namespaces and cgroup, attached; returns its exit code."""
        if c.status() != "running":
            raise StrataError(f"container {c.name} is not running")
        cfg = c.rec["Config"]
        env = [*cfg["Env"], f"HOSTNAME={cfg['Hostname']}"]
        for e in opts.env:
            key = e.split("=", 1)[0]
            env = [x for x in env if x.split("=", 1)[0] != key] + [e]
        spec = process.ProcessSpec(argv, env, opts.workdir or cfg["WorkingDir"],
                                   opts.user if opts.user is not None else cfg["User"], opts.tty)
        self._confine(c, spec)
        pid = c.state["Pid"]
        fds = {n: os.open(f"/proc/{pid}/ns/{n}", os.O_RDONLY) for n in namespaces.NAMESPACES}
        if not process.alive(pid, c.state.get("StartTime")):
            raise StrataError(f"container {c.name} is not running")
        cg = c.cgroup()
        stdio, close, outputs, stdin_w = process.make_stdio(opts.tty, opts.interactive, False)

        def enter() -> None:
            for n, fd in fds.items():
                namespaces.setns(fd, namespaces.NAMESPACES[n])

        try:
            spawned = process.spawn(spec, stdio, enter, lambda: None, cg.add)
        finally:
            for fd in [*fds.values(), *close]:
                os.close(fd)
        pump = process.Pump(attached=True)
        for fd, stream in outputs.items():
            pump.add_output(fd, stream)
        if stdin_w is not None:
            pump.add_input(sys.stdin.fileno(), stdin_w, close_dst=not opts.tty)
        if not opts.tty:
            process.forward_signals(spawned.pid)
        with process.raw_terminal(opts.tty):
            return pump.run(spawned.helper, linger=0.2)

    # --- the container's layer ---------------------------------------------------------

    def diff(self, c: Container) -> list[tuple[str, str]]:
        """docker diff: (A|C|D, path) from the container's upper dir, read anchored and
        without recursion (dirwalk), however deep the container made it."""
        upper = Path(c.rec["GraphDriver"]["Data"]["UpperDir"])
        lowers = [Path(p) for p in c.rec["GraphDriver"]["Data"]["LowerDir"].split(":")[1:]]
        out: list[tuple[str, str]] = []
        top = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for dirs, entry in dirwalk.walk(top):
                rel = "/".join([*dirs.names, entry.name])
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    out.append(("D", "/" + rel))
                else:
                    out.append(("C" if any(_exists_in(lw, rel) for lw in lowers) else "A", "/" + rel))
        except OSError as e:
            raise StrataError(f"cannot read the changes of {c.name}: {e.strerror or e}") from None
        finally:
            os.close(top)
        return sorted(out, key=lambda x: x[1])

    def commit(self, c: Container, tag: str | None, message: str, author: str,
               changes: dict[str, Any] | None = None, pause: bool = True) -> str:
        """A new image from the container's changes. A running container is frozen
        meanwhile (docker's default; pause=False reads its upper while it runs, which
        may fail with a one-line error if it changes underneath)."""
        with self._frozen(c, pause):
            return self._commit(c, tag, message, author, changes)

    @contextlib.contextmanager
    def _frozen(self, c: Container, pause: bool) -> Iterator[None]:
        """Freeze a running container for the with-block (thawed after, also on failure)."""
        if not pause or c.status() != "running":
            yield
            return
        cg = c.cgroup()
        cg.freeze()
        try:
            yield
        finally:
            cg.thaw()

    def _commit(self, c: Container, tag: str | None, message: str, author: str,
                changes: dict[str, Any] | None) -> str:
        cfg = c.rec["Config"]
        container_config = {"Env": cfg["Env"], "Cmd": cfg["Cmd"], "Entrypoint": cfg["Entrypoint"] or None,
                            "WorkingDir": "" if cfg["WorkingDir"] == "/" else cfg["WorkingDir"],
                            "User": cfg["User"], **(changes or {})}
        return self.store.commit(c.rec["Image"], Path(c.rec["GraphDriver"]["Data"]["UpperDir"]),
                                 created_by=f"strata commit {c.name}", tag=tag, comment=message,
                                 author=author, container_config=container_config)

    def export(self, c: Container, out: BinaryIO) -> None:
        """The merged filesystem as one tar, through a read-only union of its layers."""
        data = c.rec["GraphDriver"]["Data"]
        view = Path(self.store.tmp_dir) / f"export-{c.id[:12]}-{os.getpid()}"
        view.mkdir()
        lowers = ":".join([data["UpperDir"], *data["LowerDir"].split(":")[1:]])
        try:
            res = subprocess.run([unionfs_program(), "-o", f"lowerdir={lowers}", str(view)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise StrataError(f"mounting the container's layers: {res.stderr.strip()}")
            try:
                produce_layer(view, out)
            finally:
                unmount_rootfs(str(view))
        finally:
            view.rmdir()

    def top(self, c: Container) -> list[tuple[int, str, str]]:
        """(host pid, user, command) of every process in the container's PID namespace."""
        if c.status() not in ("running", "paused"):
            raise StrataError(f"container {c.name} is not running")
        want = namespaces.ns_id(c.state["Pid"], "pid")
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

    # --- prune ---------------------------------------------------------------------------

    def prune(self) -> list[str]:
        """After a crash of strata: finish containers whose monitor died, then remove
        mounts, veths and cgroups no live container owns. Returns what it did."""
        done: list[str] = []
        live: set[str] = set()
        for c in self.all():
            st = c.state
            if st["Status"] in ("starting", "running", "paused") and not c.monitor_alive():
                with c.locked():
                    self._finish(c, None, error="the container's monitor died")
                done.append(f"container {c.name}: monitor gone, stopped and cleaned up")
            elif st["Status"] in ("starting", "running", "paused"):
                live.add(c.id)
                if not rootfs_alive(c.rec["GraphDriver"]["Data"]["MergedDir"]) and c.process_alive():
                    # its strata-unionfs daemon died: the container cannot go on; its monitor cleans up
                    if c.cgroup().frozen():
                        c.cgroup().thaw()
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(st["Pid"], signal.SIGKILL)
                    done.append(f"container {c.name}: its root filesystem daemon died, container killed")
        known = {c.id for c in self.all()}
        for _src, target, fstype, _ in list_mounts(self.containers_dir):
            cid = Path(target).parent.name
            if cid not in live or cid not in known:
                done += [f"unmounted {target} ({fstype})", *unmount_rootfs(target)]
        for prefix in network.leftover_veths():
            if not any(cid.startswith(prefix) for cid in live):
                network.remove_veth(prefix)
                done.append(f"removed veth vs{prefix}")
        if network.remove_unused_bridge():
            done.append(f"removed the unused bridge {network.BRIDGE}")
        # Only this root's: another state root's containers share the strata/ cgroup parent.
        ours = {d.name.removeprefix(".rm-").removeprefix(".new-") for d in self.containers_dir.iterdir()}
        for cg in cgroups.leftovers():
            if cg.name in ours and cg.name not in live:
                cg.destroy()
                done.append(f"removed cgroup {cg.version} strata/{cg.name}")
        for d in self.containers_dir.iterdir():
            if d.name.startswith((".new-", ".rm-")):
                try:
                    remove_path(d)
                    done.append(f"removed leftover {d.name}")
                except OSError as e:
                    done.append(f"could not remove leftover {d.name}: {e.strerror or e}")
        return done


def _exists_in(layer: Path, rel: str) -> bool:
    """Whether an image layer (root's, never changed) holds rel; past PATH_MAX one
    name at a time from the layer's fd."""
    if len(rel) < 3000:
        return os.path.lexists(layer / rel)
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in rel.split("/"):
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def list_mounts(under: Path) -> list[tuple[str, str, str, str]]:
    from common.kernel import mounts as kernel_mounts

    prefix = str(under) + "/"
    return [m for m in kernel_mounts() if m[1].startswith(prefix)]


def rootfs_alive(path: str) -> bool:
    """False when the FUSE daemon behind a mounted root is gone (ENOTCONN). statfs, because
    it always reaches the daemon; a stat could be answered from cached attributes."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno != errno.ENOTCONN
    return True


def unmount_rootfs(path: str) -> list[str]:
    """Unmount a container root (FUSE through fusermount3, which also ends the daemon; overlay
    with umount2); a dead or busy mount is detached lazily. Returns problems."""
    if not is_mountpoint(path):
        return []
    fstype = next((t for _, tgt, t, _ in list_mounts(Path(path).parent) if tgt == path), "")
    if fstype.startswith("fuse"):
        res = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
        if res.returncode == 0:
            return []
    try:
        umount(path)
    except OSError:
        try:
            umount(path, MNT_DETACH)
        except OSError as e:
            return [f"unmount {path}: {e}"]
    return []
