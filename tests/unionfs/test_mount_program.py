"""The mount program contract podman, mount.fuse3 and containerd rely on."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from common.kernel import mount, umount

from .support import STRATA, daemon_pids, is_mounted, layer_dirs, mounted, overlay_opts, unmount


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STRATA, *args], capture_output=True, text=True, timeout=60)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("strata-unionfs version ")


@pytest.mark.parametrize("opts, message", [
    ("lowerdir=/nonexistent-strata", "lowerdir /nonexistent-strata: no such directory"),
    ("lowerdir={l},bogus=1", "unknown option: bogus"),
    ("lowerdir={l},upperdir={u}", "upperdir= and workdir= go together"),
    ("upperdir={u},workdir={w}", "no lowerdir= given"),
    ("lowerdir={l},fsync=maybe", "fsync=maybe: expected 0 or 1"),
    ("lowerdir={l},upperdir={u},workdir={u}", "workdir and upperdir must be separate"),
    ("lowerdir={l}::{l}", "empty layer path"),
    ("lowerdir={l},redirect_dir=maybe", "redirect_dir=maybe: expected on, follow, nofollow or off"),
    ("lowerdir={l},spin=fast", "spin=fast: expected a number"),
    ("lowerdir={l},spin=-1", "spin=-1: expected a number >= 0"),
])
def test_bad_input_one_line_error_and_nothing_mounted(tmp_path: Path, opts: str, message: str) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    r = run("-o", opts.format(l=lower, u=upper, w=work), str(mnt))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("strata-unionfs: ") and message in lines[0], r.stderr
    assert not is_mounted(mnt)


def test_workdir_on_another_filesystem(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    mount("tmpfs", work, "tmpfs")
    try:
        r = run("-o", overlay_opts([lower], upper, work), str(mnt))
    finally:
        umount(work)
    assert r.returncode == 1
    assert "same filesystem" in r.stderr and not is_mounted(mnt)


def test_podman_invocation_empty_items_volatile_and_unmount(tmp_path: Path) -> None:
    """As podman 4.3 calls it, from the graph root, with relative paths."""
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "etc").mkdir()
    (lower / "etc/os-release").write_text("ID=test\n")
    opts = "lowerdir=l0,upperdir=upper,workdir=work,,volatile,fsync=0,xino=off,noacl,threaded=1,"
    r = subprocess.run([STRATA, "-o", opts, "mnt"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        # Exit 0 means live: no wait before using it.
        assert (mnt / "etc/os-release").read_text() == "ID=test\n"
        pids = daemon_pids(mnt)
        assert len(pids) == 1
        (mnt / "etc/hostname").write_text("box\n")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pids[0]}") and time.monotonic() < deadline:
        time.sleep(0.05)
    status = Path(f"/proc/{pids[0]}/stat")
    assert not status.exists() or status.read_text().split()[2] == "Z", "daemon still running after unmount"
    assert (upper / "etc/hostname").read_text() == "box\n"


def test_umount_also_stops_the_daemon(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    with mounted("strata", [lower], upper, work, mnt):
        pids = daemon_pids(mnt)
        subprocess.run(["umount", str(mnt)], check=True)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                  for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not daemon_pids(mnt)


def test_read_only_without_upper(tmp_path: Path) -> None:
    lowers, _, _, mnt = layer_dirs(tmp_path, 2)
    (lowers[1] / "f").write_text("bottom\n")
    (lowers[0] / "g").write_text("top\n")
    with mounted("strata", lowers, None, None, mnt):
        assert sorted(os.listdir(mnt)) == ["f", "g"]
        for attempt in (lambda: (mnt / "new").write_text("x"), lambda: os.unlink(mnt / "f"),
                        lambda: os.chmod(mnt / "g", 0o600), lambda: os.mkdir(mnt / "d")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if ln.split()[1] == str(mnt))
        assert line.split()[2] == "fuse.strata-unionfs" and line.split()[3].startswith("ro")


def test_foreground_and_debug(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "x").write_text("x")
    proc = subprocess.Popen([STRATA, "-f", "-o", overlay_opts([lower], upper, work), str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "x").read_text() == "x"
        assert proc.poll() is None, "-f must keep the daemon in the foreground"
    finally:
        unmount(mnt)
    assert proc.wait(timeout=10) == 0


def test_mount_helper_convention(tmp_path: Path) -> None:
    """mount -t fuse.strata-unionfs: mount.fuse3 resets PATH, so the program must be in /usr/local/sbin."""
    helper = shutil.which("strata-unionfs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
    assert helper, "strata-unionfs is not linked into /usr/local/sbin: run `make install`"
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "hello").write_text("hi\n")
    r = subprocess.run(["mount", "-t", "fuse.strata-unionfs", "overlay", str(mnt), "-o",
                        overlay_opts([lower], upper, work) + ",nodev,noatime"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "hello").read_text() == "hi\n"
        with open("/proc/self/mounts") as f:
            fields = next(ln for ln in f if ln.split()[1] == str(mnt)).split()
        assert fields[0] == "overlay" and fields[2] == "fuse.strata-unionfs" and "nodev" in fields[3]
    finally:
        unmount(mnt)


@pytest.mark.parametrize("spin", ["spin=0", "spin=100", ""])
def test_sigterm_unmounts_and_exits(tmp_path: Path, spin: str) -> None:
    """With or without polling between requests, SIGTERM ends the daemon
    cleanly: the mount goes away, written data stays in the upper."""
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "f").write_text("lower\n")
    opts = overlay_opts([lower], upper, work) + (f",{spin}" if spin else "")
    r = run("-o", opts, str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        for i in range(200):  # a stream of requests, then idle
            (mnt / f"n{i}").write_text(str(i))
        assert (mnt / "f").read_text() == "lower\n"
        (pid,) = daemon_pids(mnt)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(mnt), "still mounted 10 s after SIGTERM"
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        status = Path(f"/proc/{pid}/stat")
        assert not status.exists() or status.read_text().split()[2] == "Z", "daemon alive after SIGTERM"
    finally:
        unmount(mnt)
    assert sorted(p.name for p in upper.iterdir()) == sorted(f"n{i}" for i in range(200))


def test_readahead_raised_to_a_whole_request(tmp_path: Path) -> None:
    """The mount's read-ahead is one request (1 MiB), not the kernel's 128 KiB: set
    by the daemon as soon as the kernel's INIT is answered (the kernel sets it from
    that reply), just after the mount command has returned."""
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    with mounted("strata", [lower], upper, work, mnt):
        st = os.stat(mnt)
        bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
        deadline = time.monotonic() + 10
        while bdi.read_text().strip() != "1024" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bdi.read_text().strip() == "1024"
