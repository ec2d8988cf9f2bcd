"""Inside a container: its own PID 1, hostname, /proc, mounts, /dev, caps, user and config."""

from __future__ import annotations

import tarfile
from pathlib import Path

from tests.runtime.conftest import IMAGE, Strata


def test_pid1_hostname_proc_and_mounts(strata: Strata) -> None:
    out = strata("run", "--rm", "--hostname", "box1", IMAGE, "sh", "-c",
                 "echo pid=$$; hostname; ls /proc | grep -c '^[0-9]'; cat /proc/mounts").stdout.splitlines()
    assert out[0] == "pid=1"
    assert out[1] == "box1"
    assert int(out[2]) <= 4  # sh, ls, grep (and nothing of the host)
    mounts_text = "\n".join(out[3:])
    assert str(strata.root) not in mounts_text  # the host's tree is gone
    assert "/work" not in mounts_text and "/sys/fs/cgroup" not in mounts_text


def test_dev_sys_and_capabilities(strata: Strata) -> None:
    out = strata("run", "--rm", IMAGE, "sh", "-c",
                 "ls /dev; echo x > /sys/x 2>/dev/null && echo sys-writable; "
                 "grep CapBnd /proc/self/status; head -c 4 /dev/urandom | wc -c").stdout
    for dev in ("null", "zero", "full", "random", "urandom", "tty", "pts", "shm"):
        assert dev in out.split()
    assert "sys-writable" not in out
    bnd = int(next(line for line in out.splitlines() if line.startswith("CapBnd")).split()[1], 16)
    assert bnd == 0xA80425FB  # docker's default set, nothing more
    assert out.splitlines()[-1].strip() == "4"
    res = strata("run", "--rm", IMAGE, "mount", "-t", "tmpfs", "x", "/mnt", check=False)
    assert res.returncode != 0  # no CAP_SYS_ADMIN


def test_image_config_env_workdir_user_entrypoint(strata: Strata) -> None:
    out = strata("run", "--rm", "-e", "FOO=bar", "-w", "/tmp/work", "-u", "nobody", IMAGE,
                 "sh", "-c", "echo $FOO; pwd; id -u; echo $PATH").stdout.splitlines()
    assert out[:3] == ["bar", "/tmp/work", "65534"]
    assert "/bin" in out[3]
    out = strata("run", "--rm", "--entrypoint", "echo", IMAGE, "hello", "world").stdout
    assert out == "hello world\n"
    res = strata("run", "--rm", IMAGE, "no-such-binary", check=False)
    assert res.returncode == 127 and "executable file not found" in res.stderr


def test_exit_code_stdin_and_tty(strata: Strata) -> None:
    assert strata("run", "--rm", IMAGE, "sh", "-c", "exit 7", check=False).returncode == 7
    assert strata("run", "--rm", "-i", IMAGE, "cat", input="through stdin\n").stdout == "through stdin\n"
    out = strata("run", "--rm", "-t", IMAGE, "sh", "-c", "tty; test -t 1 && echo is-a-tty").stdout
    assert "is-a-tty" in out


def test_bad_input_is_refused_cleanly(strata: Strata) -> None:
    for args, msg in (
        (["run", "no-such-image:1", "true"], "no such image"),
        (["run", "-v", "data", IMAGE, "true"], "invalid volume specification"),
        (["run", "-v", "/does/not/exist:/x", IMAGE, "true"], "does not exist"),
        (["run", "--network", "bogus", IMAGE, "true"], "invalid --network"),
        (["run", "-p", "abc", IMAGE, "true"], "invalid port"),
        (["run", "-m", "1k", IMAGE, "true"], "memory limit"),
        (["run", "--name", "bad/name", IMAGE, "true"], "invalid container name"),
    ):
        res = strata(*args, check=False)
        assert res.returncode == 1, args
        assert msg in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert strata("ps", "-a", "-q").stdout == ""
    strata("create", "--name", "taken", IMAGE, "true")
    res = strata("create", "--name", "taken", IMAGE, "true", check=False)
    assert res.returncode == 1 and "already in use" in res.stderr


def test_hostile_image_cannot_touch_the_host(strata: Strata, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("host data\n")
    tar_path = tmp_path / "hostile.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name in ("bin", "etc"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tf.addfile(info)
        tf.add("/bin/busybox", "bin/busybox")
        for name, target in (("bin/sh", "busybox"), ("bin/ls", "busybox"), ("bin/cat", "busybox"),
                             ("proc", str(victim)), ("dev", str(victim)), ("data", str(victim)),
                             ("etc/hosts", str(victim / "keep")),
                             ("escape", "../../../../../" + str(victim))):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    strata("import", str(tar_path), "hostile:1")
    try:
        out = strata("run", "--rm", "-v", "hostvol:/data", "-v", "hostvol2:/escape/sub", "hostile:1",
                     "sh", "-c",
                     "echo pwned > /data/x; echo pwned > /escape/sub/y; ls /proc | grep -c '^[0-9]'; "
                     "cat /etc/hosts; ls /dev").stdout
        assert "pwned" not in (victim / "keep").read_text()
        assert sorted(p.name for p in victim.iterdir()) == ["keep"]
        assert "localhost" in out  # /etc/hosts is the container's own, bound over the symlink
    finally:
        strata("rmi", "hostile:1", check=False)
        strata("volume", "rm", "hostvol", "hostvol2", check=False)
