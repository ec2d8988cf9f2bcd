"""Container lifecycle through the CLI: detached runs, logs, exec, stop/kill/wait, the
container's layer (diff, commit, export), top, ps across CLI restarts, prune after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from tests.runtime.conftest import IMAGE, Strata


def _wait_for_log(strata: Strata, name: str, text: str) -> None:
    deadline = time.monotonic() + 20
    while text not in strata("logs", name).stdout:
        assert time.monotonic() < deadline, f"{text!r} never appeared in the log of {name}"
        time.sleep(0.1)


def test_logs_are_complete_after_exit(strata: Strata) -> None:
    strata.run_d("--name", "counter", IMAGE, "sh", "-c", "seq 1 20000; echo done >&2")
    assert strata("wait", "counter").stdout.strip() == "0"
    res = strata("logs", "counter")
    assert res.stdout.split() == [str(i) for i in range(1, 20001)]
    assert res.stderr == "done\n"
    assert strata("logs", "-f", "counter").stdout == res.stdout
    strata.run_d("--name", "slow", IMAGE, "sh", "-c", "for i in 1 2 3 4; do echo $i; sleep 0.3; done")
    assert strata("logs", "-f", "slow").stdout == "1\n2\n3\n4\n"  # follows until the exit


def test_exec_joins_a_running_container(strata: Strata) -> None:
    strata.run_d("--name", "host1", "--hostname", "joined", IMAGE, "sleep", "300")
    out = strata("exec", "host1", "sh", "-c", "hostname; ps -o pid,args; echo $HOSTNAME").stdout
    lines = out.splitlines()
    assert lines[0] == "joined"
    assert any(line.split()[:3] == ["1", "sleep", "300"] for line in lines)
    assert strata("exec", "host1", "sh", "-c", "exit 5", check=False).returncode == 5
    assert strata("exec", "-i", "host1", "cat", input="piped\n").stdout == "piped\n"
    assert "on a tty" in strata("exec", "-t", "host1", "sh", "-c", "test -t 0 && echo on a tty").stdout
    as_nobody = strata("exec", "-u", "nobody", "-w", "/tmp", "host1", "sh", "-c", "id -u; pwd")
    assert as_nobody.stdout == "65534\n/tmp\n"
    top = strata("top", "host1").stdout
    assert "sleep 300" in top
    ps = json.loads(strata("ps", "--format", "json").stdout)
    assert [c["Names"] for c in ps] == ["host1"] and ps[0]["State"] == "running"


def test_stop_sends_sigterm_then_sigkill(strata: Strata) -> None:
    strata.run_d("--name", "polite", IMAGE, "sh", "-c",
                 "trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done")
    strata.run_d("--name", "stubborn", IMAGE, "sh", "-c",
                 "trap 'echo ignoring TERM' TERM; echo ready; while true; do sleep 0.1; done")
    _wait_for_log(strata, "polite", "ready")
    _wait_for_log(strata, "stubborn", "ready")
    strata("stop", "-t", "10", "polite")
    assert strata.inspect("polite")["State"]["ExitCode"] == 3
    assert "got TERM" in strata("logs", "polite").stdout
    strata("stop", "-t", "1", "stubborn")
    st = strata.inspect("stubborn")["State"]
    assert st["ExitCode"] == 137 and st["Status"] == "exited"
    assert "ignoring TERM" in strata("logs", "stubborn").stdout
    strata.run_d("--name", "killme", IMAGE, "sh", "-c",
                 "trap 'exit 42' USR1; echo ready; while true; do sleep 0.1; done")
    _wait_for_log(strata, "killme", "ready")
    strata("kill", "-s", "USR1", "killme")
    assert strata("wait", "killme").stdout.strip() == "42"
    strata.run_d("--name", "killme9", IMAGE, "sleep", "300")
    strata("kill", "killme9")
    assert strata("wait", "killme9").stdout.strip() == str(128 + signal.SIGKILL)


def test_restart_a_stopped_container_and_ps(strata: Strata) -> None:
    strata("create", "--name", "again", IMAGE, "sh", "-c", "echo run >> /runs; cat /runs | wc -l")
    assert "again" in strata("ps", "-a").stdout and "again" not in strata("ps").stdout
    strata("start", "again")
    assert strata("wait", "again").stdout.strip() == "0"
    strata("start", "-a", "again")
    assert strata("logs", "again").stdout.split() == ["1", "2"]
    assert "Exited (0)" in strata("ps", "-a").stdout


def test_diff_commit_run_and_export(strata: Strata, tmp_path: Path) -> None:
    strata("run", "--name", "changer", IMAGE, "sh", "-c",
           "echo new > /added; rm /etc/motd; echo edited >> /etc/passwd; mkdir -p /data/sub")
    diff = strata("diff", "changer").stdout.splitlines()
    assert "A /added" in diff and "D /etc/motd" in diff and "C /etc/passwd" in diff
    assert "A /data/sub" in diff
    assert not any(line.endswith(("/etc/hosts", "/etc/hostname", "/proc")) for line in diff)
    image_id = strata("commit", "-c", 'CMD ["cat", "/added"]', "changer", "changed:1").stdout.strip()
    assert image_id.startswith("sha256:")
    assert strata("run", "--rm", "changed:1").stdout == "new\n"
    out = strata("run", "--rm", "changed:1", "sh", "-c", "ls /etc/motd 2>&1; tail -1 /etc/passwd").stdout
    assert "No such file" in out and out.endswith("edited\n")
    export = tmp_path / "export.tar"
    strata("export", "-o", str(export), "changer")
    with tarfile.open(export) as tf:
        names = set(tf.getnames())
        assert "added" in names and "bin/busybox" in names and "etc/motd" not in names
        member = tf.extractfile("added")
        assert member is not None and member.read() == b"new\n"
    strata("rm", "changer")
    strata("rmi", "changed:1")


def test_pause_and_unpause_v1_and_v2(strata: Strata) -> None:
    for version in ("v1", "v2"):
        name = f"ticker{version}"
        strata.run_d("--name", name, IMAGE, "sh", "-c", "while true; do date +%s%N; sleep 0.05; done",
                     env={"STRATA_CGROUP": version})
        assert strata.inspect(name)["HostConfig"]["Cgroup"] == version
        _wait_for_log(strata, name, "\n")
        strata("pause", name)
        assert strata.inspect(name)["State"]["Status"] == "paused"
        before = strata("logs", name).stdout
        time.sleep(0.5)
        assert strata("logs", name).stdout == before
        strata("unpause", name)
        deadline = time.monotonic() + 10
        while strata("logs", name).stdout == before:
            assert time.monotonic() < deadline, "no output after unpause"
            time.sleep(0.1)
        strata("rm", "-f", name)


def test_rm_and_prune_after_kill_9_of_strata(strata: Strata) -> None:
    cid = strata.run_d("--name", "orphan", "-v", "orphanvol:/data", "-p", "18181:80", IMAGE, "sleep", "300")
    monitor = strata.inspect("orphan")["State"]["MonitorPid"]
    os.kill(monitor, signal.SIGKILL)
    time.sleep(0.2)
    assert any(cid in t for t in Path("/proc/self/mounts").read_text().split())
    out = strata("system", "prune").stdout
    assert "orphan" in out
    st = strata.inspect("orphan")["State"]
    assert st["Status"] == "exited"
    assert not any(cid in t for t in Path("/proc/self/mounts").read_text().split())
    vol = json.loads(strata("volume", "inspect", "orphanvol").stdout)[0]
    assert vol["Status"]["MountCount"] == 0
    strata("rm", "orphan")
    strata("volume", "rm", "orphanvol")
    # a foreground run whose CLI is killed: rm -f cleans up the same way
    proc = subprocess.Popen(strata.cmd("run", "--name", "fg", IMAGE, "sleep", "300"))
    try:
        deadline = time.monotonic() + 20
        while strata("ps", "-q").stdout.strip() == "":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    strata.inspect("fg")
    strata("rm", "-f", "fg")


def test_kernel_overlay_storage_driver_for_comparison(strata: Strata) -> None:
    strata("run", "--name", "kov", "--storage-driver", "overlay", IMAGE, "sh", "-c",
           "echo k > /k; rm /etc/motd")
    assert strata.inspect("kov")["GraphDriver"]["Name"] == "overlay"
    assert strata("diff", "kov").stdout.splitlines() == ["C /etc", "D /etc/motd", "A /k"]
    strata("commit", "kov", "kov:1")
    assert strata("run", "--rm", "kov:1", "cat", "/k").stdout == "k\n"
    strata("rm", "kov")
    strata("rmi", "kov:1")


def test_prune_after_kill_9_of_the_rootfs_daemon(strata: Strata) -> None:
    cid = strata.run_d("--name", "fsdead", IMAGE, "sleep", "300")
    merged = strata.inspect(cid)["GraphDriver"]["Data"]["MergedDir"]
    daemons = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(int(p)).endswith(" " + merged)]
    assert len(daemons) == 1, daemons
    os.kill(daemons[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "fsdead" not in strata("system", "prune").stdout:
        assert time.monotonic() < deadline, "prune never noticed the dead root filesystem"
        time.sleep(0.2)
    assert strata("wait", "fsdead").stdout.strip() == "137"
    assert merged not in Path("/proc/self/mounts").read_text()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
