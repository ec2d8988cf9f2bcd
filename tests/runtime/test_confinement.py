"""Issue 11's "Host disks open to containers" and "No seccomp, masks incomplete": each
reproduction is blocked by default, and allowed again by the docker flag that allows it
(--device, --privileged, --cap-add SYS_ADMIN, --security-opt seccomp=unconfined).
Capabilities (--cap-add/--cap-drop), no-new-privileges, a custom seccomp profile, exec
under the same confinement, and bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtime import probes
from tests.runtime.conftest import Loop, Strata


def _probe(strata: Strata, image: str, loop: Loop, *flags: str, cgroup: str = "v1") -> dict[str, bool]:
    def runner(script: str) -> str:
        return strata("run", "--rm", "--network", "none", *flags, image, "sh", "-c", script,
                      env={"STRATA_CGROUP": cgroup}).stdout

    return probes.run(loop, runner)


def _read_disk(strata: Strata, image: str, loop: Loop, *flags: str, node: str, cgroup: str) -> str:
    return strata("run", "--rm", "--network", "none", *flags, image, "sh", "-c",
                  f"dd if={node} bs=512 count=1 2>&1; dd if=/dev/zero of={node} bs=512 count=1 seek=4096 "
                  "conv=notrunc 2>/dev/null && echo WROTE", env={"STRATA_CGROUP": cgroup}, check=False).stdout


@pytest.mark.parametrize("cgroup", ["v1", "v2"])
def test_host_disk_only_through_device_or_privileged(strata: Strata, probe_image: str, loop_device: Loop,
                                                     cgroup: str) -> None:
    loop = loop_device
    mknod = f"mknod /tmp/hd b {loop.major} {loop.minor} && echo MKNOD; "
    out = strata("run", "--rm", "--network", "none", probe_image, "sh", "-c",
                 mknod + "dd if=/tmp/hd bs=512 count=1 2>&1; dd if=/dev/zero of=/tmp/hd count=1 2>&1",
                 env={"STRATA_CGROUP": cgroup}, check=False).stdout
    assert "MKNOD" in out  # docker too lets mknod through ("b *:* m"), not the open
    assert loop.marker not in out and out.count("Operation not permitted") == 2, out
    assert Path(loop.path).exists()
    # --device gives it (rwm by default; :r reads but cannot write), --privileged gives all.
    out = _read_disk(strata, probe_image, loop, "--device", f"{loop.path}:/dev/xdisk", node="/dev/xdisk",
                     cgroup=cgroup)
    assert loop.marker in out and "WROTE" in out
    out = _read_disk(strata, probe_image, loop, "--device", f"{loop.path}:/dev/xdisk:r", node="/dev/xdisk",
                     cgroup=cgroup)
    assert loop.marker in out and "WROTE" not in out
    out = _read_disk(strata, probe_image, loop, "--privileged", node=loop.path, cgroup=cgroup)
    assert loop.marker in out and "WROTE" in out


def test_issue_11_probes_blocked_and_the_flags_that_allow_them(strata: Strata, probe_image: str,
                                                             loop_device: Loop) -> None:
    default = _probe(strata, probe_image, loop_device)
    allowed = [name for name, ok in default.items() if ok and name != "mknod a block device"]
    assert not allowed, f"a default container could: {allowed}"

    privileged = _probe(strata, probe_image, loop_device, "--privileged")
    for name in ("read a raw block device", "write a raw block device", "unshare -U -r id", "read /proc/keys",
                 "read /proc/timer_list", "list /sys/firmware", "keyctl(2)", "mount a tmpfs",
                 "open /proc/sys/vm/drop_caches to write", "open /sys/kernel/profiling to write"):
        assert privileged[name], f"--privileged should allow: {name}"
    if Path("/proc/sysrq-trigger").exists():
        assert privileged["open /proc/sysrq-trigger to write"]

    sys_admin = _probe(strata, probe_image, loop_device, "--cap-add", "SYS_ADMIN")
    assert sys_admin["unshare -U -r id"] and sys_admin["mount a tmpfs"]
    assert not sys_admin["keyctl(2)"] and not sys_admin["read a raw block device"]

    unconfined = _probe(strata, probe_image, loop_device, "--security-opt", "seccomp=unconfined")
    assert unconfined["unshare -U -r id"] and unconfined["keyctl(2)"]
    assert not unconfined["mount a tmpfs"] and not unconfined["read /proc/keys"]


def _caps(strata: Strata, image: str, *flags: str) -> int:
    out = strata("run", "--rm", "--network", "none", *flags, image, "grep", "CapBnd",
                 "/proc/self/status").stdout
    return int(out.split()[1], 16)


def test_cap_add_and_cap_drop(strata: Strata, probe_image: str) -> None:
    default = 0xA80425FB
    assert _caps(strata, probe_image) == default
    assert _caps(strata, probe_image, "--cap-drop", "ALL") == 0
    assert _caps(strata, probe_image, "--cap-drop", "all", "--cap-add", "cap_chown") == 1 << 0
    assert _caps(strata, probe_image, "--cap-drop", "CHOWN", "--cap-add", "NET_ADMIN") == \
        (default & ~(1 << 0)) | (1 << 12)
    out = strata("run", "--rm", "--network", "none", "--cap-drop", "ALL", probe_image, "sh", "-c",
                 "chown 65534 /tmp && echo CHOWNED", check=False)
    assert "CHOWNED" not in out.stdout


def test_no_new_privileges_custom_profile_and_exec(strata: Strata, probe_image: str, tmp_path: Path) -> None:
    out = strata("run", "--rm", "--network", "none", probe_image, "grep", "-E", "NoNewPrivs|Seccomp:",
                 "/proc/self/status").stdout.split()
    assert out == ["NoNewPrivs:", "0", "Seccomp:", "2"]
    out = strata("run", "--rm", "--network", "none", "--security-opt", "no-new-privileges", probe_image,
                 "grep", "NoNewPrivs", "/proc/self/status").stdout.split()
    assert out == ["NoNewPrivs:", "1"]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}))
    cid = strata.run_d("--network", "none", "--security-opt", f"seccomp={profile}", probe_image,
                       "sleep", "60")
    profile.unlink()  # the container keeps the profile it was created with
    res = strata("exec", cid, "mkdir", "/tmp/d", check=False)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    strata("rm", "-f", cid)
    cid = strata.run_d("--network", "none", probe_image, "sleep", "60")
    out = strata("exec", cid, "sh", "-c", "grep -E 'CapBnd|Seccomp:' /proc/self/status; unshare -U -r id",
                 check=False)
    assert out.stdout.split()[:4] == ["CapBnd:", "00000000a80425fb", "Seccomp:", "2"]
    assert out.returncode != 0  # exec'd processes get the same filter


def test_bad_confinement_options_are_refused_in_one_line(strata: Strata, probe_image: str,
                                                        tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_NOPE", "syscalls": []}')
    for args, msg in (
        (["--cap-add", "BOGUS"], "unknown capability"),
        (["--device", "/no/such/dev"], "No such file or directory"),
        (["--device", "/etc/hostname"], "not a device node"),
        (["--device", "/dev/null:/dev/n:rwx"], "invalid device"),
        (["--security-opt", "apparmor=x"], "invalid --security-opt"),
        (["--security-opt", f"seccomp={tmp_path / 'missing.json'}"], "No such file or directory"),
        (["--security-opt", f"seccomp={bad}"], "unknown action"),
    ):
        res = strata("run", "--rm", "--network", "none", *args, probe_image, "true", check=False)
        assert res.returncode == 1, args
        assert msg in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert strata("ps", "-a", "-q").stdout == ""
