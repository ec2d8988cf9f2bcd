"""strata-unionfs behaviour the kernel comparison cannot cover: every lower
whiteout form, copy-up details, inode numbers, listings that change while
read, crash safety of copy-up, and the rest of what a filesystem has."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .support import STRATA, daemon_pids, layer_dirs, mounted, overlay_opts, snapshot, unmount


def test_every_lower_whiteout_and_opaque_form(tmp_path: Path) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 2)
    top, bottom = lowers
    for name in ("chr", "oci", "d_trusted", "d_user", "d_fuse", "d_marker", "keep"):
        (bottom / name).mkdir()
        (bottom / name / "old").write_text("old\n")
    os.mknod(top / "chr", stat.S_IFCHR, os.makedev(0, 0))
    (top / ".wh.oci").touch(mode=0o000)
    for d, xattr in (("d_trusted", "trusted.overlay.opaque"), ("d_user", "user.overlay.opaque"),
                     ("d_fuse", "user.fuseoverlayfs.opaque")):
        (top / d).mkdir()
        os.setxattr(top / d, xattr, b"y")
        (top / d / "new").write_text("new\n")
    (top / "d_marker").mkdir()
    (top / "d_marker/.wh..wh..opq").touch()
    (top / "d_marker/new").write_text("new\n")
    (top / "keep").mkdir()
    (top / "keep/.wh.old").touch()
    (top / "keep/added").write_text("added\n")
    with mounted("strata", lowers, upper, work, mnt):
        assert sorted(os.listdir(mnt)) == ["d_fuse", "d_marker", "d_trusted", "d_user", "keep"]
        for d in ("d_trusted", "d_user", "d_fuse", "d_marker"):
            assert os.listdir(mnt / d) == ["new"], d
            assert not (mnt / d / "old").exists()
            assert "user.overlay.opaque" not in os.listxattr(mnt / d)
        assert os.listdir(mnt / "keep") == ["added"]
        assert not (mnt / ".wh.oci").exists() and not (mnt / "keep/.wh.old").exists()
        # Writing over an OCI whiteout uses the kernel form in the upper.
        os.mkdir(mnt / "oci")
        assert os.listdir(mnt / "oci") == []
        os.unlink(mnt / "keep/added")
    assert os.getxattr(upper / "oci", "trusted.overlay.opaque") == b"y"
    st = os.lstat(upper / "keep/added")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(upper) for n in ds + fs)


def test_copy_up_keeps_metadata_inode_and_leaves_work_clean(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "d/e").mkdir(parents=True)
    f = lower / "d/e/file"
    f.write_bytes(b"x" * 100_000)
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o2751)
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "trusted.b", b"2")
    os.utime(f, ns=(111_000_000_000, 222_000_000_000))
    os.chmod(lower / "d", 0o705)
    for d in ("d", "d/e"):
        os.utime(lower / d, ns=(333_000_000_000, 444_000_000_000))
    with mounted("strata", [lower], upper, work, mnt):
        before = os.stat(mnt / "d/e/file")
        dir_ino = os.stat(mnt / "d").st_ino
        with open(mnt / "d/e/file", "ab") as out:
            out.write(b"y")
        after = os.stat(mnt / "d/e/file")
        assert after.st_ino == before.st_ino and os.stat(mnt / "d").st_ino == dir_ino
        assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (1234, 5678, 0o2751)
        assert os.getxattr(mnt / "d/e/file", "user.a") == b"1"
        assert os.getxattr(mnt / "d/e/file", "trusted.b") == b"2"
        assert after.st_size == 100_001
        # The inode number survives the kernel forgetting the file.
        subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
        assert os.stat(mnt / "d/e/file").st_ino == before.st_ino
    ust = os.stat(upper / "d/e/file")
    assert ust.st_mtime_ns != 222_000_000_000  # it was written after the copy
    assert stat.S_IMODE(os.stat(upper / "d").st_mode) == 0o705
    for d in ("d", "d/e"):  # copying up into a directory is no change of it
        assert os.stat(upper / d).st_mtime_ns == 444_000_000_000, d
    assert (upper / "d/e/file").read_bytes() == b"x" * 100_000 + b"y"
    assert f.read_bytes() == b"x" * 100_000, "the lower layer must never change"
    assert os.listdir(work / "work") == []


def test_chmod_copies_up_without_changing_data(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "f").write_text("data\n")
    os.utime(lower / "f", ns=(10**18, 10**18))
    with mounted("strata", [lower], upper, work, mnt):
        os.chmod(mnt / "f", 0o600)
        st = os.stat(mnt / "f")
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 10**18
    assert (upper / "f").read_text() == "data\n"


def test_listing_stays_consistent_while_entries_go(tmp_path: Path) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 2)
    for i in range(600):
        (lowers[i % 2] / f"f{i:04}").write_text(str(i))
    with mounted("strata", lowers, upper, work, mnt):
        seen: list[str] = []
        with os.scandir(mnt) as it:
            for n, entry in enumerate(it):
                seen.append(entry.name)
                if n % 3 == 0:
                    os.unlink(mnt / entry.name)
                if n == 100:
                    (mnt / "zz-new").write_text("new")
        names = [s for s in seen if s != "zz-new"]
        assert len(names) == len(set(names)) == 600, "an entry was skipped or seen twice"
        assert len(os.listdir(mnt)) == 600 - 200 + 1


def test_hard_links_in_upper_share_one_inode(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "a").write_text("a\n")
    with mounted("strata", [lower], upper, work, mnt):
        os.link(mnt / "a", mnt / "b")
        sa, sb = os.stat(mnt / "a"), os.stat(mnt / "b")
        assert sa.st_ino == sb.st_ino and sb.st_nlink == 2
        with open(mnt / "b", "a") as f:
            f.write("via b\n")
        assert (mnt / "a").read_text() == "a\nvia b\n"
        os.unlink(mnt / "a")
        assert (mnt / "b").read_text() == "a\nvia b\n" and os.stat(mnt / "b").st_nlink == 1
    assert os.stat(upper / "b").st_nlink == 1


def test_everything_else_a_filesystem_has(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "log").write_text("one\n")
    (lower / "m").write_bytes(b"\0" * 8192)
    with mounted("strata", [lower], upper, work, mnt):
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"two\n")
        os.fsync(fd)
        os.close(fd)
        assert (mnt / "log").read_text() == "one\ntwo\n"
        with open(mnt / "log", "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        with open(mnt / "m", "r+b") as f, mmap.mmap(f.fileno(), 8192) as mm:
            mm[100:105] = b"hello"
            mm.flush()
        assert (mnt / "m").read_bytes()[100:105] == b"hello"
        os.symlink("log", mnt / "sl")
        assert os.readlink(mnt / "sl") == "log" and (mnt / "sl").read_text().startswith("one")
        os.setxattr(mnt / "sl", "trusted.t", b"v", follow_symlinks=False)
        assert os.getxattr(mnt / "sl", "trusted.t", follow_symlinks=False) == b"v"
        os.mknod(mnt / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        assert os.stat(mnt / "blk").st_rdev == os.makedev(7, 0)
        sock_path = mnt / "sock"
        subprocess.run(["python3", "-c", f"import socket; socket.socket(socket.AF_UNIX).bind('{sock_path}')"],
                       check=True)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        os.truncate(mnt / "log", 2)
        assert (mnt / "log").read_text() == "on"
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        assert os.stat(mnt / "log").st_size == 0
        sv, real = os.statvfs(mnt), os.statvfs(upper)
        assert sv.f_blocks == real.f_blocks and sv.f_bsize == real.f_bsize
        os.utime(mnt / "m", ns=(1, 2))
        assert os.stat(mnt / "m").st_mtime_ns == 2
        os.chown(mnt / "m", 42, 43)
        assert (os.stat(mnt / "m").st_uid, os.stat(mnt / "m").st_gid) == (42, 43)


def test_new_files_belong_to_the_caller_and_follow_setgid(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    for d in (tmp_path, *tmp_path.parents):  # let the user reach the mountpoint
        if d == Path("/tmp"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o011)
    (lower / "shared").mkdir(mode=0o777)
    os.chmod(lower / "shared", 0o2777)
    os.chown(lower / "shared", 0, 777)
    with mounted("strata", [lower], upper, work, mnt):
        def as_user() -> None:
            os.setgid(1001)
            os.setuid(1000)
        subprocess.run(["sh", "-c", f"echo hi > {mnt}/shared/f && mkdir {mnt}/shared/d && touch {mnt}/mine"],
                       preexec_fn=as_user, check=False)
        st = os.stat(mnt / "shared/f")
        assert (st.st_uid, st.st_gid) == (1000, 777)
        assert os.stat(mnt / "shared/d").st_mode & stat.S_ISGID
        assert not (mnt / "mine").exists(), "the root dir is 0755 root: a user cannot create there"


def test_squash_to_root_and_uid_mapping(tmp_path: Path) -> None:
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    (lower / "f").write_text("x")
    os.chown(lower / "f", 100005, 100007)
    with mounted("strata", [lower], upper, work, mnt, extra="squash_to_root"):
        st = os.stat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (0, 0)
    with mounted("strata", [lower], upper, work, mnt,
                 extra="uidmapping=0:100000:65536,gidmapping=0:100000:65536"):
        st = os.stat(mnt / "f")
        assert (st.st_uid, st.st_gid) == (5, 7)
        os.chown(mnt / "f", 9, 9)
    assert (os.stat(upper / "f").st_uid, os.stat(upper / "f").st_gid) == (100009, 100009)


@pytest.mark.parametrize("size_mib", [512])
def test_kill_during_copy_up_leaves_old_or_new(tmp_path: Path, size_mib: int) -> None:
    """kill -9 the daemon while it copies a large file up: after a remount the
    file is the lower content, whole (or the complete new one), never torn."""
    (lower,), upper, work, mnt = layer_dirs(tmp_path, 1)
    block = bytes(range(256)) * 4096
    with open(lower / "big", "wb") as f:
        for _ in range(size_mib):
            f.write(block)
    mnt.mkdir(exist_ok=True)
    r = subprocess.run([STRATA, "-o", overlay_opts([lower], upper, work), str(mnt)], capture_output=True)
    assert r.returncode == 0
    try:
        (pid,) = daemon_pids(mnt)
        writer = subprocess.Popen(["sh", "-c", f"echo tail >> {mnt}/big"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not os.listdir(work / "work"):
            time.sleep(0.002)
        assert os.listdir(work / "work"), "the copy-up never started in the work dir"
        os.kill(pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        unmount(mnt)
    with mounted("strata", [lower], upper, work, mnt):
        size = os.stat(mnt / "big").st_size
        assert size in (size_mib << 20, (size_mib << 20) + 5)
        with open(mnt / "big", "rb") as f:
            for _ in range(size_mib):
                assert f.read(len(block)) == block
    assert os.listdir(work / "work") == [], "a remount clears what the crash left in the work dir"
    assert snapshot(lower)["big"][4][0] == size_mib << 20


def test_few_fds_many_directories(tmp_path: Path) -> None:
    """With a soft and hard fd limit of 64 the daemon keeps 16 directory fds:
    lookups, copy-ups, renames and removals across 300 directories reopen the
    evicted ones and give what the kernel's overlayfs gives."""
    seen = {}
    for kind in ("kernel", "strata"):
        lowers, upper, work, mnt = layer_dirs(tmp_path / kind, 1)
        for i in range(300):
            d = lowers[0] / f"a{i % 10}" / f"b{i}"
            d.mkdir(parents=True)
            (d / "f").write_text(f"{i}\n")
        if kind == "kernel":
            ctx = mounted(kind, lowers, upper, work, mnt)
        else:
            mnt.mkdir(exist_ok=True)
            opts = overlay_opts(lowers, upper, work)
            subprocess.run(["prlimit", "--nofile=64:64", STRATA, "-o", opts, str(mnt)], check=True)
            ctx = contextlib.nullcontext(mnt)
        try:
            with ctx:
                for i in range(0, 300, 3):
                    d = mnt / f"a{i % 10}" / f"b{i}"
                    with open(d / "f", "a") as f:
                        f.write("more\n")
                    os.rename(d / "f", d / "g")
                    (d / "new").write_text("n\n")
                for i in range(1, 300, 7):
                    shutil.rmtree(mnt / f"a{i % 10}" / f"b{i}")
                seen[kind] = snapshot(mnt)
        finally:
            if kind == "strata":
                unmount(mnt)
    assert seen["strata"] == seen["kernel"]
