"""The eight VolumeDriver endpoints through a real `strata serve` process, called the
way Docker Engine 20.10 calls them (no Content-Type, Opts null, empty Activate body)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common import kernel
from common.errors import StrataError
from plugin_api import protocol as p
from plugin_api.client import PluginClient, PluginError, discover
from plugin_api.server import PluginService

from .conftest import STRATA, Env, Service

ID_A = "a" * 64
ID_B = "b" * 64


def test_docker_call_sequence(service: Service) -> None:
    """What `docker volume create -d strata v1` and two `docker run -v v1:/data` send."""
    assert service.raw(p.ACTIVATE, b"") == (200, b'{"Implements": ["VolumeDriver", "GraphDriver"]}\n')
    assert service.call(p.CAPABILITIES, {}) == {"Capabilities": {"Scope": "local"}}
    assert service.call(p.GET, {"Name": "v1"}) == {"Err": "no such volume: v1"}
    assert service.call(p.CREATE, {"Name": "v1", "Opts": None}) == {}
    for _ in range(2):
        assert "Volume" in service.call(p.GET, {"Name": "v1"})
    mp = service.call(p.MOUNT, {"Name": "v1", "ID": ID_A})["Mountpoint"]
    assert Path(mp).is_dir()
    Path(mp, "copied-in").write_text("image content")
    assert service.call(p.UNMOUNT, {"Name": "v1", "ID": ID_A}) == {}
    assert service.call(p.MOUNT, {"Name": "v1", "ID": ID_B}) == {"Mountpoint": mp}
    vol = service.call(p.GET, {"Name": "v1"})["Volume"]
    assert vol["Name"] == "v1" and vol["Mountpoint"] == mp and vol["CreatedAt"]
    assert vol["Status"]["MountCount"] == 1 and vol["Status"]["Size"] == len("image content")
    assert service.call(p.PATH, {"Name": "v1"}) == {"Mountpoint": mp}
    listed = {"Name": "v1", "Mountpoint": mp, "CreatedAt": vol["CreatedAt"]}
    assert service.call(p.LIST, {}) == {"Volumes": [listed]}
    assert "in use" in service.call(p.REMOVE, {"Name": "v1"})["Err"]
    assert service.call(p.UNMOUNT, {"Name": "v1", "ID": ID_B}) == {}
    assert service.call(p.REMOVE, {"Name": "v1"}) == {}
    assert service.call(p.LIST, {}) == {"Volumes": []}
    assert not Path(mp).exists()


def test_responses_are_docker_plugin_json(service: Service) -> None:
    async def go() -> tuple[str, bytes]:
        async with PluginClient(service.address) as c:
            assert c._session is not None
            async with c._session.post(
                "http://plugin" + p.LIST, data=b"{}\n", headers={"Accept": p.ACCEPT},
                skip_auto_headers=("Content-Type",),
            ) as resp:
                return resp.headers["Content-Type"], await resp.read()

    ctype, body = asyncio.run(go())
    assert ctype.startswith(p.CONTENT_TYPE) and body.endswith(b"\n")


def test_opts_forms_and_drivers(service: Service, env: Env) -> None:
    assert service.call(p.CREATE, {"Name": "o1", "Opts": {}}) == {}
    assert service.call(p.CREATE, {"Name": "o2"}) == {}
    assert service.call(p.CREATE, {"Name": "t1", "Opts": {"type": "tmpfs", "size": "4m"}}) == {}
    mp = service.call(p.MOUNT, {"Name": "t1", "ID": ID_A})["Mountpoint"]
    assert kernel.is_mountpoint(mp)
    assert service.call(p.UNMOUNT, {"Name": "t1", "ID": ID_A}) == {}
    assert not kernel.is_mountpoint(mp)
    (env.bind_root / "h").mkdir()
    dev = str(env.bind_root / "h")
    assert service.call(p.CREATE, {"Name": "b1", "Opts": {"type": "bind", "device": dev}}) == {}
    assert service.call(p.MOUNT, {"Name": "b1", "ID": ID_A}) == {"Mountpoint": dev}


@pytest.mark.parametrize(
    ("endpoint", "data", "message"),
    [
        (p.CREATE, b"{not json", "malformed JSON"),
        (p.CREATE, b"[1, 2]", "must be a JSON object"),
        (p.CREATE, b"\xff\xfe", "malformed JSON"),
        (p.CREATE, b"{}", "missing field 'Name'"),
        (p.CREATE, b'{"Name": null}', "missing field 'Name'"),
        (p.CREATE, b'{"Name": 7}', "field 'Name' must be a string"),
        (p.CREATE, b'{"Name": "a/b"}', "invalid volume name"),
        (p.CREATE, b'{"Name": "../../etc"}', "invalid volume name"),
        (p.CREATE, b'{"Name": "ab\\u0000cd"}', "invalid volume name"),
        (p.CREATE, json.dumps({"Name": "n" * 300}).encode(), "too long"),
        (p.CREATE, b'{"Name": "ok1", "Opts": {"bogus": "1"}}', "unknown option 'bogus'"),
        (p.CREATE, b'{"Name": "ok1", "Opts": "type=tmpfs"}', "Opts must be an object"),
        (p.CREATE, b'{"Name": "ok1", "Opts": {"type": "bind", "device": "/etc"}}', "outside the allowed"),
        (p.CREATE, b'{"Name": "ok1", "Opts": {"type": "bind", "device": "/"}}', "outside the allowed"),
        (p.CREATE, b'{"Name": "ok1", "Opts": {"type": "clone", "size": "1g"}}', "cannot enforce a size"),
        (p.MOUNT, b'{"Name": "ok1"}', "missing field 'ID'"),
        (p.MOUNT, b'{"Name": "ok1", "ID": ""}', "mount ID is empty"),
        (p.MOUNT, b'{"Name": "nosuch", "ID": "x"}', "no such volume: nosuch"),
        (p.UNMOUNT, b'{"Name": "nosuch", "ID": "x"}', "no such volume: nosuch"),
        (p.REMOVE, b'{"Name": "nosuch"}', "no such volume: nosuch"),
        (p.PATH, b'{"Name": "nosuch"}', "no such volume: nosuch"),
        (p.GET, b'{"Name": "../state"}', "invalid volume name"),
        (p.CREATE, b'{"Name": "big", "Opts": {"x": "' + b"a" * (p.MAX_BODY + 10) + b'"}}', "too large"),
    ],
)
def test_bad_requests_get_err_and_change_nothing(service: Service, env: Env, endpoint: str, data: bytes,
                                                 message: str) -> None:
    before = sorted(os.listdir(env.root / "volumes"))
    status, raw = service.raw(endpoint, data)
    assert status == 200
    err = json.loads(raw)["Err"]
    assert message in err, err
    assert sorted(os.listdir(env.root / "volumes")) == before


def test_chunked_huge_body_refused(service: Service) -> None:
    async def body() -> object:
        for _ in range(20):
            yield b" " * 10000

    async def go() -> dict[str, str]:
        async with PluginClient(service.address) as c:
            assert c._session is not None
            async with c._session.post("http://plugin" + p.CREATE, data=body()) as resp:
                out: dict[str, str] = await resp.json(content_type=None)
                return out

    assert "too large" in asyncio.run(go())["Err"]


def test_unknown_endpoint(service: Service) -> None:
    status, raw = service.raw("/VolumeDriver.Explode", b"{}")
    assert status == 404 and "unknown endpoint" in json.loads(raw)["Err"]


def test_socket_mode_spec_file_and_clean_shutdown(service: Service) -> None:
    assert stat.S_IMODE(os.stat(service.socket).st_mode) == 0o600
    spec = service.spec_dir / f"{service.name}.spec"
    assert spec.read_text().strip() == f"unix://{service.socket}"
    assert discover(service.name, socket_dirs=(), spec_dirs=(service.spec_dir,)) == service.address
    assert service.stop() == 0
    assert not service.socket.exists() and not spec.exists()


def test_client_discovery_and_calls(service: Service, tmp_path: Path) -> None:
    sockdir = tmp_path / "plugins"
    sockdir.mkdir()
    (sockdir / "viasock.sock").symlink_to(service.socket)
    assert discover("viasock", socket_dirs=(sockdir,), spec_dirs=()) == f"unix://{sockdir}/viasock.sock"
    (sockdir / "viajson.json").write_text(json.dumps({"Name": "viajson", "Addr": service.address}))
    assert discover("viajson", socket_dirs=(), spec_dirs=(sockdir,)) == service.address
    (sockdir / "bad.spec").write_text("http://somewhere\n")
    with pytest.raises(PluginError, match="neither unix"):
        discover("bad", socket_dirs=(), spec_dirs=(sockdir,))
    with pytest.raises(PluginError, match="not found"):
        discover("absent", socket_dirs=(sockdir,), spec_dirs=(sockdir,))

    async def go() -> None:
        async with PluginClient(service.address) as c:
            assert await c.activate() == ["VolumeDriver", "GraphDriver"]
            assert await c.capabilities() == {"Scope": "local"}
            await c.create("cv", {"mode": "0700"})
            mp = await c.mount("cv", ID_A)
            assert await c.path("cv") == mp
            assert (await c.get("cv"))["Status"]["MountCount"] == 1
            assert [v["Name"] for v in await c.list()] == ["cv"]
            with pytest.raises(PluginError, match="in use"):
                await c.remove("cv")
            await c.unmount("cv", ID_A)
            await c.remove("cv")
            with pytest.raises(PluginError, match="no such volume"):
                await c.get("cv")

    asyncio.run(go())


def test_systemd_readiness_after_listening(env: Env, tmp_path: Path) -> None:
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        ns.settimeout(30)
        sock_dir = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
        proc = subprocess.Popen(
            [STRATA, "--root", str(env.root), "serve", "--config", str(env.config),
             "--socket", str(sock_dir / "n.sock"), "--spec-dir", str(tmp_path)],
            env={**os.environ, "NOTIFY_SOCKET": str(notify)}, stderr=subprocess.DEVNULL,
        )
        try:
            assert ns.recv(100) == b"READY=1"
            assert (sock_dir / "n.sock").is_socket()
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
            shutil.rmtree(sock_dir)


def test_serve_never_replaces_a_non_socket(env: Env, tmp_path: Path) -> None:
    victim = tmp_path / "precious"
    victim.write_text("keep me")
    res = env.strata("serve", "--config", str(env.config), "--socket", str(victim),
                     "--spec-dir", str(tmp_path), check=False)
    assert res.returncode == 1 and "is not a socket" in res.stderr
    assert victim.read_text() == "keep me"


def test_second_server_on_same_socket_refused(service: Service, env: Env) -> None:
    res = env.strata("serve", "--config", str(env.config), "--socket", str(service.socket),
                     "--spec-dir", str(service.spec_dir), check=False)
    assert res.returncode == 1 and "already listening" in res.stderr
    assert service.answers()


@dataclass
class _MemoryVolume:
    name: str
    mountpoint: Path
    created_at: str = "2024-01-01T00:00:00Z"
    status: dict[str, Any] = field(default_factory=dict)


class _MemoryDriver:
    """A VolumeDriver that is not the volume manager: directories under one top, no state
    kept on disk. The server must take it as it takes the manager."""

    scope = "global"

    def __init__(self, top: Path) -> None:
        self.top = top
        self.volumes: dict[str, _MemoryVolume] = {}
        self.recovered = False

    def recover(self) -> list[str]:
        self.recovered = True
        return []

    def create(self, name: str, opts: object) -> object:
        (self.top / name).mkdir()
        self.volumes[name] = _MemoryVolume(name, self.top / name, status={"Opts": opts})
        return None

    def remove(self, name: str) -> None:
        (self.top / name).rmdir()
        del self.volumes[name]

    def mount(self, name: str, mount_id: str) -> Path:
        return self.get(name).mountpoint

    def unmount(self, name: str, mount_id: str) -> None:
        self.get(name)

    def path(self, name: str) -> Path:
        return self.get(name).mountpoint

    def get(self, name: str) -> _MemoryVolume:
        if name not in self.volumes:
            raise StrataError(f"unknown to memory: {name}")
        return self.volumes[name]

    def list_volumes(self) -> list[_MemoryVolume]:
        return [_MemoryVolume(v.name, v.mountpoint, v.created_at) for v in self.volumes.values()]


def test_the_server_serves_any_volume_driver(tmp_path: Path) -> None:
    driver = _MemoryDriver(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    sock = sock_dir / "mem.sock"

    async def go() -> None:
        service = PluginService(driver, sock, sock_dir / "mem.spec")
        await service.start()
        try:
            async with PluginClient(f"unix://{sock}") as c:
                assert await c.activate() == ["VolumeDriver"]
                assert await c.capabilities() == {"Scope": "global"}
                await c.create("m1", {"k": "v"})
                mp = str(tmp_path / "m1")
                assert await c.mount("m1", ID_A) == mp and await c.path("m1") == mp
                await c.unmount("m1", ID_A)
                listed = {"Name": "m1", "Mountpoint": mp, "CreatedAt": "2024-01-01T00:00:00Z"}
                assert await c.get("m1") == {**listed, "Status": {"Opts": {"k": "v"}}}
                assert await c.list() == [listed]
                await c.remove("m1")
                with pytest.raises(PluginError, match="unknown to memory: m1"):
                    await c.get("m1")
        finally:
            await service.stop()

    try:
        asyncio.run(go())
    finally:
        shutil.rmtree(sock_dir)
    assert driver.recovered
