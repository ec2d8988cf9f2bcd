"""Volumes in containers: named volumes of the in-process manager (created on first use),
host directories, --volumes-from, :ro, and a Docker volume plugin (`strata serve`)
through --volume-driver."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import processes
from tests.runtime.conftest import IMAGE, STRATA, Strata


def test_named_volume_keeps_data_and_is_shared(strata: Strata) -> None:
    try:
        strata("run", "--rm", "-v", "keep:/vol", IMAGE, "sh", "-c", "echo first > /vol/f")
        assert strata("run", "--rm", "-v", "keep:/vol", IMAGE, "cat", "/vol/f").stdout == "first\n"
        strata.run_d("--name", "owner", "-v", "keep:/vol", IMAGE, "sleep", "300")
        out = strata("run", "--rm", "--volumes-from", "owner", IMAGE, "sh", "-c",
                     "echo second >> /vol/f; cat /vol/f").stdout
        assert out == "first\nsecond\n"
        res = strata("run", "--rm", "--volumes-from", "owner:ro", IMAGE, "sh", "-c", "echo x > /vol/g",
                     check=False)
        assert res.returncode != 0 and "Read-only file system" in res.stderr
        vol = json.loads(strata("volume", "inspect", "keep").stdout)[0]
        assert vol["Status"]["MountCount"] == 1  # only owner holds it now
        strata("rm", "-f", "owner")
        vol = json.loads(strata("volume", "inspect", "keep").stdout)[0]
        assert vol["Status"]["MountCount"] == 0
    finally:
        strata("volume", "rm", "keep", check=False)


def test_ro_and_host_directories(strata: Strata, tmp_path: Path) -> None:
    host = tmp_path / "shared"
    host.mkdir()
    (host / "in").write_text("from host\n")
    out = strata("run", "--rm", "-v", f"{host}:/h", IMAGE, "sh", "-c", "cat /h/in; echo back > /h/out").stdout
    assert out == "from host\n" and (host / "out").read_text() == "back\n"
    res = strata("run", "--rm", "-v", f"{host}:/h:ro", IMAGE, "sh", "-c", "echo x > /h/in", check=False)
    assert res.returncode != 0 and "Read-only file system" in res.stderr
    assert (host / "in").read_text() == "from host\n"
    res = strata("run", "--rm", "-v", "rovol:/r:ro", IMAGE, "touch", "/r/x", check=False)
    assert res.returncode != 0
    strata("volume", "rm", "rovol")


@pytest.fixture
def plugin(strata: Strata) -> Iterator[str]:
    """`strata serve` as a Docker volume plugin under a name of its own."""
    name = f"strata-rt-{secrets.token_hex(3)}"
    sock = Path("/run/docker/plugins") / f"{name}.sock"
    root = str(strata.root.parent / "plugin-state")
    proc = subprocess.Popen([STRATA, "--root", root, "serve", "--name", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.is_socket():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "strata serve did not come up"
            time.sleep(0.1)
        yield name
    finally:
        processes.stop(proc, 20)
        sock.unlink(missing_ok=True)


def test_volume_driver_plugin(strata: Strata, plugin: str) -> None:
    strata("run", "--rm", "--volume-driver", plugin, "-v", "plugged:/p", IMAGE, "sh", "-c", "echo hi > /p/f")
    out = strata("run", "--rm", "--volume-driver", plugin, "-v", "plugged:/p", IMAGE, "cat", "/p/f").stdout
    assert out == "hi\n"
    served = strata.root.parent / "plugin-state" / "volumes"
    assert any(p.name == "f" for p in served.rglob("f"))
    # the in-process manager never saw it
    assert "plugged" not in strata("volume", "ls").stdout


def test_a_new_volume_starts_with_the_image_content(strata: Strata) -> None:
    out = strata("run", "--rm", "-v", "etcvol:/etc", IMAGE, "sh", "-c", "cat /etc/motd; echo mine > /etc/new")
    assert out.stdout == "image motd\n"
    out = strata("run", "--rm", "-v", "etcvol:/etc", IMAGE, "cat", "/etc/new", "/etc/motd").stdout
    assert out == "mine\nimage motd\n"
    strata("volume", "rm", "etcvol")
