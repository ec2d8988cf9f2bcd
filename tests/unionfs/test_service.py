"""The mount service behind `strata-unionfs`: mounts it makes look and behave
as the command's own, land in the caller's mount namespace, and outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import cgroupfs
from unionfs import launch, service

from .support import STRATA, daemon_pids, is_mounted, layer_dirs, mounted, unmount


def _service_pid() -> int | None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes().startswith(b"strata-unionfs\0(mount service)"):
                    return int(p.name)
            except OSError:
                continue
    return None


def _wait_for_service() -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pid = _service_pid()
        if pid is not None and os.path.exists(launch.socket_path(service.__file__)):
            return pid
        time.sleep(0.05)
    raise AssertionError("the mount service did not start")


@pytest.fixture
def fresh_service() -> Iterator[None]:
    """No service at the start (the next mount starts one); none left at the end."""
    service.stop()
    yield
    service.stop()


def test_a_mount_starts_the_service_and_the_next_goes_through_it(tmp_path: Path,
                                                                 fresh_service: None) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "f").write_text("lower\n")
    with mounted("strata", lowers, upper, work, mnt):  # mounts itself, starts the service
        assert (mnt / "f").read_text() == "lower\n"
    pid = _wait_for_service()
    with mounted("strata", lowers, upper, work, mnt):
        (daemon,) = daemon_pids(mnt)  # shown as `strata-unionfs -o ... MNT`
        assert daemon != pid
        with open(f"/proc/{daemon}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[1]) == pid and int(fields[3]) == daemon  # forked by it, in its own session
        (mnt / "g").write_text("upper\n")
    assert (upper / "g").read_text() == "upper\n"
    assert _service_pid() == pid


def test_a_live_mount_survives_the_service(tmp_path: Path, fresh_service: None) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "f").write_text("lower\n")
    subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]},upperdir={upper},workdir={work}", str(mnt)],
                   check=True)
    unmount(mnt)
    pid = _wait_for_service()
    try:
        subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]},upperdir={upper},workdir={work}", str(mnt)],
                       check=True)
        os.kill(pid, signal.SIGKILL)
        assert (mnt / "f").read_text() == "lower\n"
        (mnt / "f").write_text("changed\n")
        assert (upper / "f").read_text() == "changed\n"
        # The next mount finds a dead socket, mounts by itself and starts a new service.
        other = tmp_path / "other"
        other.mkdir()
        subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]}", str(other)], check=True)
        try:
            assert (other / "f").read_text() == "lower\n"
        finally:
            unmount(other)
        assert _wait_for_service() != pid
    finally:
        unmount(mnt)


def test_a_mount_lands_in_the_callers_mount_namespace(tmp_path: Path, fresh_service: None) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "f").write_text("lower\n")
    opts = f"lowerdir={lowers[0]},upperdir={upper},workdir={work}"
    subprocess.run([STRATA, "-o", opts, str(mnt)], check=True)
    unmount(mnt)
    _wait_for_service()
    script = f"{STRATA} -o {opts} {mnt} && cat {mnt}/f && umount {mnt}"
    out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-ec", script],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "lower\n"
    assert not is_mounted(mnt)  # never in this namespace


def test_errors_reach_the_caller_through_the_service(tmp_path: Path, fresh_service: None) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]}", str(mnt)], check=True)
    unmount(mnt)
    _wait_for_service()
    out = subprocess.run([STRATA, "-o", f"lowerdir={tmp_path}/missing", str(mnt)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("strata-unionfs: ") and "missing" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)


def test_the_daemon_lives_in_the_callers_cgroup(tmp_path: Path, fresh_service: None) -> None:
    """Not in the cgroup of whoever started the service: stopping that service's
    cgroup must not kill other callers' mounts."""

    mounts = cgroupfs.mountinfo()
    v1 = next((m for m, fstype, sopts in mounts if fstype == "cgroup" and "memory" in sopts.split(",")), None)
    root = v1 or next((m for m, fstype, _ in mounts if fstype == "cgroup2"), None)
    assert root is not None, "no cgroup hierarchy mounted"
    field = "memory" if v1 else ""  # the controllers field of /proc/PID/cgroup for that hierarchy
    group = Path(root) / f"strata-test-{os.getpid()}"
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    opts = f"lowerdir={lowers[0]},upperdir={upper},workdir={work}"
    subprocess.run([STRATA, "-o", opts, str(mnt)], check=True)
    unmount(mnt)
    _wait_for_service()
    group.mkdir()
    try:
        subprocess.run(["sh", "-ec", f"echo $$ > {group}/cgroup.procs; exec {STRATA} -o {opts} {mnt}"],
                       check=True, timeout=60)
        try:
            (daemon,) = daemon_pids(mnt)
            paths = {ctrls: path for _, ctrls, path in
                     (line.split(":", 2) for line in Path(f"/proc/{daemon}/cgroup").read_text().splitlines())}
            assert paths[field] == f"/{group.name}"
        finally:
            unmount(mnt)
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_a_stopped_service_removes_its_socket(tmp_path: Path, fresh_service: None) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]}", str(mnt)], check=True)
    unmount(mnt)
    pid = _wait_for_service()
    subprocess.run([sys.executable, "-m", "unionfs.service", "--stop"], check=True, timeout=60)
    deadline = time.monotonic() + 10
    while _service_pid() == pid and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _service_pid() is None
    assert not os.path.exists(launch.socket_path(service.__file__))


def test_nobody_else_can_reach_the_service(tmp_path: Path, fresh_service: None) -> None:
    lowers, _, _, mnt = layer_dirs(tmp_path, 1)
    subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]}", str(mnt)], check=True)
    unmount(mnt)
    _wait_for_service()
    path = launch.socket_path(service.__file__)
    assert os.stat(launch.SERVICE_DIR).st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600
    probe = (f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect({path!r})")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                          probe], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "PermissionError" in out.stderr


def test_a_command_line_too_long_for_the_service_is_mounted_the_long_way(tmp_path: Path,
                                                                        fresh_service: None) -> None:
    """Longer than one socket message (~300 KB): the command mounts by itself; here the
    missing layers make it the one-line error it would be anyway, and nothing is mounted."""
    lowers, _, _, mnt = layer_dirs(tmp_path, 1)
    subprocess.run([STRATA, "-o", f"lowerdir={lowers[0]}", str(mnt)], check=True)
    unmount(mnt)
    pid = _wait_for_service()
    missing = ":".join(f"{tmp_path}/missing-{i:06d}" for i in range(1200))  # ~100 KB, under execve's limit
    out = subprocess.run([STRATA, *(["-o", f"lowerdir={missing}"] * 3), str(mnt)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("strata-unionfs: ") and len(out.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)
    assert _service_pid() == pid  # still serving
