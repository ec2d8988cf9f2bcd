"""`create`: from what the user asked (RunOptions) and the image's config to a
container record and its directories, every option checked first, so a bad one
changes nothing. The directories are made in a `.new-ID` staging directory and
renamed into place with the record under the names lock: a container exists
whole or not at all (prune sweeps a staging leftover). The image is held until `rm`.
Container names follow one rule, NAME_RE, here."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field

from common.errors import StrataError
from common.tree import remove_path
from runtime import capabilities, cgroups, devices, etc_files, mounts, network, process, record, seccomp
from runtime.confine import SECCOMP_PROFILE, security_opts
from runtime.containers import Container, Runtime
from runtime.record import Config, HostConfig, Layers, Record
from unionfs import client

# docker's container names, a leading "/" allowed (docker prints names that way).
NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
STORAGE_DRIVERS = (client.STRATA, client.KERNEL)
# The init layer: mount points the runtime owns, so they never land in the container's layer.
INIT_DIRS = ("proc", "sys", "dev", "etc")


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
    storage_driver: str = client.STRATA
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)


def create(rt: Runtime, opts: RunOptions) -> Container:
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
    hosts = [_parse_add_host(h) for h in opts.add_hosts]
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
    profile_path, _ = security_opts(opts.security_opt)
    profile = None
    if profile_path is not None and profile_path != "unconfined":
        profile = seccomp.load(profile_path)
        seccomp.build(profile, capabilities.DEFAULT)  # a bad profile is refused here
    mount_list = [mounts.parse(v, opts.volume_driver) for v in opts.volumes]
    for ref in opts.volumes_from:
        src_name, _, mode = ref.partition(":")
        src = rt.get(src_name)
        mount_list += [mounts.with_mode(m, mode or None) for m in src.record.mounts]
    dests = [m.Destination for m in mount_list]
    dup = {d for d in dests if dests.count(d) > 1}
    if dup:
        raise StrataError(f"duplicate mount point: {sorted(dup)[0]}")
    owner = network.joined_container(net_mode)
    if owner is not None:
        rt.get(owner)
    image_id = rt.store.resolve(opts.image)
    image = rt.store.image(image_id)
    cfg = image.config.get("config") or {}
    entrypoint = [opts.entrypoint] if opts.entrypoint is not None else list(cfg.get("Entrypoint") or [])
    if opts.entrypoint == "":
        entrypoint = []
    cmd = opts.command or ([] if opts.entrypoint is not None else list(cfg.get("Cmd") or []))
    argv = entrypoint + cmd
    if not argv:
        raise StrataError("no command specified (the image has no Entrypoint or Cmd)")
    cid = secrets.token_hex(32)
    # -e NAME takes the value from our environment, as docker does (and is dropped when unset)
    given = [e if "=" in e else f"{e}={os.environ[e]}" for e in opts.env if "=" in e or e in os.environ]
    cdir = rt.containers_dir / cid
    rec = Record(
        id=cid, name="", created=record.timestamp(), path=argv[0], args=argv[1:], image=image_id,
        config=Config(
            hostname=opts.hostname or cid[:12],
            user=opts.user if opts.user is not None else cfg.get("User", ""),
            env=process.merge_env(cfg.get("Env") or [], given), cmd=cmd, entrypoint=entrypoint,
            working_dir=opts.workdir or cfg.get("WorkingDir") or "/", tty=opts.tty,
            open_stdin=opts.interactive, image=opts.image,
        ),
        host_config=HostConfig(
            cgroup=cgroups.default_version(), auto_remove=opts.auto_remove, memory=opts.memory or 0,
            nano_cpus=int((opts.cpus or 0) * 1e9), pids_limit=opts.pids_limit or 0, network_mode=net_mode,
            port_bindings=ports, dns=opts.dns, extra_hosts=hosts, volumes_from=opts.volumes_from,
            volume_driver=opts.volume_driver or "", privileged=opts.privileged, cap_add=opts.cap_add,
            cap_drop=opts.cap_drop, devices=device_list, security_opt=opts.security_opt,
        ),
        mounts=mount_list,
        layers=Layers(opts.storage_driver, [str(p) for p in [cdir / "init", *image.lowerdirs]],
                      str(cdir / "upper"), str(cdir / "work"), str(cdir / "merged")),
    )
    staging = rt.containers_dir / f".new-{cid}"
    for d in ("init", "upper", "work", "merged"):
        (staging / d).mkdir(parents=True)
    for d in INIT_DIRS:
        (staging / "init" / d).mkdir(exist_ok=True)
    for f in etc_files.FILES:
        (staging / "init" / f).touch()
    if profile is not None:  # docker too keeps the profile given at create, not the file
        (staging / SECCOMP_PROFILE).write_text(json.dumps(profile))
    try:
        for m in mount_list:
            mounts.ensure(m, rt.root_arg)
        with rt.names_locked():
            taken = {c.name for c in rt.all()}
            name = opts.name.lstrip("/") if opts.name else _generate_name(taken, cid)
            if name in taken:
                raise StrataError(f"the container name {name!r} is already in use")
            rec.name = name
            record.save(staging, rec)
            rt.store.hold(cid, image_id)
            os.rename(staging, cdir)
    except BaseException:
        remove_path(staging)
        raise
    return Container(rt, rec)


def _generate_name(taken: set[str], cid: str) -> str:
    """docker-style adjective_animal, derived from the id, never one in use."""
    words = ("amber", "brisk", "calm", "deft", "eager", "fond", "glad", "keen", "lucid", "merry")
    things = ("otter", "heron", "lynx", "finch", "ibex", "koala", "marten", "newt", "quail", "wren")
    for i in range(len(words) * len(things)):
        n = int(cid[i % 50:i % 50 + 8], 16) + i
        name = f"{words[n % len(words)]}_{things[(n // len(words)) % len(things)]}"
        if name not in taken:
            return name
    return f"strata_{cid[:12]}"


def _parse_add_host(spec: str) -> tuple[str, str]:
    name, sep, addr = spec.partition(":")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
    except OSError:
        addr = ""
    if not sep or not name or not addr:
        raise StrataError(f"invalid --add-host {spec!r}: expected HOST:IP")
    return name, addr
