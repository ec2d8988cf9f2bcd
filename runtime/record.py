"""The container record, typed: what `create` decided and what the monitor did.

The runtime works on `Record` (dataclasses for the config, the host config, the
state, the network settings and the layers) and asks `Status` which verbs apply
(`can_pause()`, `can_kill()`, ...), as youki's container state does. Docker's
inspect shape exists only at the edges: `to_docker` is what `inspect` prints and
what `container.json` holds, `from_docker` reads it back. The file keeps exactly
the shape strata has always written (Config, HostConfig, Mounts, State,
NetworkSettings, GraphDriver, plus strata's own State fields), so existing state
roots read as they are and no key is spelt anywhere else. Saved with
common.atomic.write_atomic: a crash leaves the old record or the new, never a torn one.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.atomic import write_atomic
from common.errors import StrataError
from runtime.cgroups import Limits
from runtime.devices import Mapping
from runtime.mounts import Mount
from runtime.network import Port, joined_container
from unionfs.client import Union

RECORD_FILE = "container.json"


def timestamp() -> str:
    """Now, as docker writes Created, StartedAt and FinishedAt."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Status(StrEnum):
    """Where a container is in its life. The recorded one is the monitor's word; the
    live one (Container.status) is checked against the kernel, and the guards below
    are asked of that."""

    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"

    def is_up(self) -> bool:
        """It has a process (docker shows `Up`)."""
        return self in (Status.RUNNING, Status.PAUSED)

    def is_monitored(self) -> bool:
        """A monitor should be looking after it (for a recorded status)."""
        return self in (Status.STARTING, Status.RUNNING, Status.PAUSED)

    def can_start(self) -> bool:
        return not self.is_up()

    def can_kill(self) -> bool:
        return self.is_up()

    def can_stop(self) -> bool:
        return self.is_up()

    def can_pause(self) -> bool:
        return self is Status.RUNNING

    def can_unpause(self) -> bool:
        return self is Status.PAUSED

    def can_exec(self) -> bool:
        return self is Status.RUNNING

    def can_remove(self) -> bool:
        """Without --force: only a container that has no process."""
        return not self.is_up()


@dataclass
class Config:
    """What runs, and as whom (docker's Config)."""

    hostname: str
    user: str
    env: list[str]
    cmd: list[str]
    entrypoint: list[str]
    working_dir: str
    tty: bool
    open_stdin: bool
    image: str  # the reference as the user gave it


@dataclass
class HostConfig:
    """What the host gives it: limits, network, confinement (docker's HostConfig)."""

    cgroup: str  # "v1" or "v2", chosen at create
    auto_remove: bool = False
    memory: int = 0
    nano_cpus: int = 0
    pids_limit: int = 0
    network_mode: str = "bridge"
    port_bindings: list[Port] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    extra_hosts: list[tuple[str, str]] = field(default_factory=list)  # (name, address)
    volumes_from: list[str] = field(default_factory=list)
    volume_driver: str = ""
    privileged: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    devices: list[Mapping] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)

    @property
    def limits(self) -> Limits:
        return Limits(self.memory or None, self.nano_cpus / 1e9 or None, self.pids_limit or None)

    @property
    def network_owner(self) -> str | None:
        """The container whose network namespace this one joins (--network container:NAME)."""
        return joined_container(self.network_mode)


@dataclass
class State:
    """What happened to it (docker's State, plus strata's own fields: who looks after
    the process, and which volumes are attached so teardown can let them go)."""

    status: Status = Status.CREATED
    pid: int = 0
    exit_code: int = 0
    error: str = ""
    started_at: str = ""
    finished_at: str = ""
    oom_killed: bool = False
    start_time: int | None = None  # of pid: with it, an identity that survives pid reuse
    monitor_pid: int | None = None
    monitor_start_time: int | None = None
    attached_mounts: list[int] | None = None  # indexes into Record.mounts


@dataclass
class NetworkSettings:
    ip_address: str = ""
    gateway: str = ""
    ports: list[Port] = field(default_factory=list)  # published, once set up


@dataclass
class Layers:
    """Where its root comes from (docker's GraphDriver): a union of `driver`'s kind
    (unionfs.client) over `lowers`, top first -- the init layer, then the image's --
    with the container's own upper, mounted at `merged`."""

    driver: str
    lowers: list[str]
    upper: str
    work: str
    merged: str

    @property
    def image_layers(self) -> list[str]:
        """The image's layers alone: without the init layer, which holds only the runtime's
        mount points (/proc, /dev, /etc/hosts...) and must not show in diff or export."""
        return self.lowers[1:]

    def union(self) -> Union:
        return Union(self.lowers, self.upper, self.work)


@dataclass
class Record:
    id: str
    name: str  # without docker's leading "/"
    created: str
    path: str
    args: list[str]
    image: str  # the image id
    config: Config
    host_config: HostConfig
    mounts: list[Mount]
    layers: Layers
    state: State = field(default_factory=State)
    network: NetworkSettings = field(default_factory=NetworkSettings)

    @property
    def argv(self) -> list[str]:
        return [self.path, *self.args]


# --- docker's shape: the file and `inspect` -----------------------------------------------


def _ports_json(ports: list[Port]) -> dict[str, Any]:
    return {f"{p.container}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(p.host)}] for p in ports}


def _state_json(st: State, status: Status) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Status": str(status), "Running": status.is_up(), "Paused": status is Status.PAUSED,
        "Pid": st.pid, "ExitCode": st.exit_code, "Error": st.error, "StartedAt": st.started_at,
        "FinishedAt": st.finished_at, "OOMKilled": st.oom_killed,
    }
    own = {"StartTime": st.start_time, "MonitorPid": st.monitor_pid,
           "MonitorStartTime": st.monitor_start_time, "AttachedMounts": st.attached_mounts}
    return out | {k: v for k, v in own.items() if v is not None}  # absent until the monitor sets them


def to_docker(rec: Record, live: Status | None = None) -> dict[str, Any]:
    """The record as docker inspect shows a container; `live` overrides the recorded status."""
    cfg, hc, lay = rec.config, rec.host_config, rec.layers
    return {
        "Id": rec.id, "Name": "/" + rec.name, "Created": rec.created, "Path": rec.path, "Args": rec.args,
        "Image": rec.image,
        "Config": {"Hostname": cfg.hostname, "User": cfg.user, "Env": cfg.env, "Cmd": cfg.cmd,
                   "Entrypoint": cfg.entrypoint, "WorkingDir": cfg.working_dir, "Tty": cfg.tty,
                   "OpenStdin": cfg.open_stdin, "Image": cfg.image},
        "HostConfig": {
            "AutoRemove": hc.auto_remove, "Memory": hc.memory, "NanoCpus": hc.nano_cpus,
            "PidsLimit": hc.pids_limit, "NetworkMode": hc.network_mode,
            "PortBindings": [[p.host, p.container] for p in hc.port_bindings], "Dns": hc.dns,
            "ExtraHosts": [f"{n}:{a}" for n, a in hc.extra_hosts], "VolumesFrom": hc.volumes_from,
            "VolumeDriver": hc.volume_driver, "Cgroup": hc.cgroup, "Privileged": hc.privileged,
            "CapAdd": hc.cap_add, "CapDrop": hc.cap_drop,
            "Devices": [{"PathOnHost": d.host, "PathInContainer": d.container, "CgroupPermissions": d.access}
                        for d in hc.devices],
            "SecurityOpt": hc.security_opt,
        },
        "Mounts": [m.to_json() for m in rec.mounts],
        "State": _state_json(rec.state, live or rec.state.status),
        "NetworkSettings": {"IPAddress": rec.network.ip_address, "Gateway": rec.network.gateway,
                            "Ports": _ports_json(rec.network.ports)},
        "GraphDriver": {"Name": lay.driver, "Data": {"LowerDir": ":".join(lay.lowers), "UpperDir": lay.upper,
                                                     "WorkDir": lay.work, "MergedDir": lay.merged}},
    }


def from_docker(d: dict[str, Any]) -> Record:
    """The record from its file. Keys later strata added (Privileged ... SecurityOpt) may
    be missing from older records; anything else missing is a KeyError."""
    cfg, hc, st, net = d["Config"], d["HostConfig"], d["State"], d["NetworkSettings"]
    data = d["GraphDriver"]["Data"]
    return Record(
        id=d["Id"], name=d["Name"].lstrip("/"), created=d["Created"], path=d["Path"], args=d["Args"],
        image=d["Image"],
        config=Config(cfg["Hostname"], cfg["User"], cfg["Env"], cfg["Cmd"], cfg["Entrypoint"],
                      cfg["WorkingDir"], cfg["Tty"], cfg["OpenStdin"], cfg.get("Image", "")),
        host_config=HostConfig(
            cgroup=hc["Cgroup"], auto_remove=hc["AutoRemove"], memory=hc["Memory"], nano_cpus=hc["NanoCpus"],
            pids_limit=hc["PidsLimit"], network_mode=hc["NetworkMode"],
            port_bindings=[Port(h, c) for h, c in hc["PortBindings"]], dns=hc["Dns"],
            extra_hosts=[(n, a) for n, _, a in (h.partition(":") for h in hc["ExtraHosts"])],
            volumes_from=hc.get("VolumesFrom", []), volume_driver=hc.get("VolumeDriver", ""),
            privileged=hc.get("Privileged", False), cap_add=hc.get("CapAdd", []),
            cap_drop=hc.get("CapDrop", []),
            devices=[Mapping(m["PathOnHost"], m["PathInContainer"], m["CgroupPermissions"])
                     for m in hc.get("Devices", [])],
            security_opt=hc.get("SecurityOpt", []),
        ),
        mounts=[Mount.from_json(m) for m in d["Mounts"]],
        layers=Layers(d["GraphDriver"]["Name"], data["LowerDir"].split(":"), data["UpperDir"],
                      data["WorkDir"], data["MergedDir"]),
        state=State(
            status=Status(st["Status"]), pid=st["Pid"], exit_code=st["ExitCode"], error=st["Error"],
            started_at=st["StartedAt"], finished_at=st["FinishedAt"], oom_killed=st["OOMKilled"],
            start_time=st.get("StartTime"), monitor_pid=st.get("MonitorPid"),
            monitor_start_time=st.get("MonitorStartTime"), attached_mounts=st.get("AttachedMounts"),
        ),
        network=NetworkSettings(
            net["IPAddress"], net["Gateway"],
            [Port(int(e["HostPort"]), int(k.split("/")[0])) for k, v in net["Ports"].items() for e in v[:1]],
        ),
    )


# --- on disk -------------------------------------------------------------------------------


def load(container_dir: Path) -> Record:
    """The record in container_dir; a one-line StrataError if there is none or it is unreadable."""
    path = container_dir / RECORD_FILE
    try:
        return from_docker(json.loads(path.read_text()))
    except FileNotFoundError:
        raise StrataError(f"no such container: {container_dir.name}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StrataError(f"unreadable container record {path}: {e!r}") from None


def save(container_dir: Path, rec: Record) -> None:
    write_atomic(container_dir / RECORD_FILE, json.dumps(to_docker(rec), indent=1).encode())


def exists(container_dir: Path) -> bool:
    return os.path.exists(container_dir / RECORD_FILE)
