"""`strata volume ...` on the same state as a running service."""

from __future__ import annotations

import json

from plugin_api import protocol as p

from .conftest import Env, Service


def test_volume_commands_with_service_running(env: Env, service: Service) -> None:
    assert env.strata("volume", "create", "--label", "team=a", "-o", "mode=0700", "c1").stdout == "c1\n"
    anon = env.strata("volume", "create").stdout.strip()
    assert len(anon) == 64
    # The service sees what the CLI made, and the other way round.
    assert "Volume" in service.call(p.GET, {"Name": "c1"})
    service.call(p.CREATE, {"Name": "s1", "Opts": {"type": "tmpfs", "size": "8m"}})
    mp = service.call(p.MOUNT, {"Name": "s1", "ID": "x" * 64})["Mountpoint"]

    table = env.strata("volume", "ls").stdout.splitlines()
    assert table[0].split() == ["VOLUME", "NAME", "TYPE", "MOUNTS", "SIZE", "CREATED"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["s1"][1:3] == ["tmpfs", "1"] and rows["c1"][1:3] == ["local", "0"]
    assert sorted(env.strata("volume", "ls", "-q").stdout.split()) == sorted([anon, "c1", "s1"])

    listed = json.loads(env.strata("volume", "ls", "--format", "json").stdout)
    assert {v["Name"] for v in listed} == {anon, "c1", "s1"}
    info = json.loads(env.strata("volume", "inspect", "c1", "s1").stdout)
    assert info[0]["Labels"] == {"team": "a"} and info[0]["Options"] == {"mode": "0700"}
    assert info[1]["Mountpoint"] == mp and info[1]["Status"]["SizeLimit"] == 8 << 20

    res = env.strata("volume", "rm", "s1", check=False)
    assert res.returncode == 1 and "strata: volume s1 is in use" in res.stderr
    res = env.strata("volume", "inspect", "nope", check=False)
    assert res.returncode == 1 and res.stderr == "strata: no such volume: nope\n"
    res = env.strata("volume", "create", "-o", "type", "bad1", check=False)
    assert res.returncode == 1 and "expected KEY=VALUE" in res.stderr
    res = env.strata("volume", "prune", check=False)
    assert res.returncode == 1 and "pass -f" in res.stderr

    out = env.strata("volume", "prune", "-f").stdout
    assert "c1" in out and anon in out and "s1" not in out and "Total reclaimed space" in out
    assert service.call(p.LIST, {})["Volumes"] == [{"Name": "s1", "Mountpoint": mp,
                                                    "CreatedAt": info[1]["CreatedAt"]}]
    service.call(p.UNMOUNT, {"Name": "s1", "ID": "x" * 64})
    assert env.strata("volume", "rm", "s1").stdout == "s1\n"
    assert env.strata("volume", "ls", "-q").stdout == ""


def test_help_lists_verbs(env: Env) -> None:
    out = env.strata("volume", "--help").stdout
    for verb in ("create", "ls", "inspect", "rm", "prune"):
        assert verb in out
    assert "docker volume create -d strata" in env.strata("serve", "--help").stdout
