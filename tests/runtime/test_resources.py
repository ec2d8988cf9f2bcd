"""cgroup limits: memory (the OOM killer ends the container: 137), pids (a fork loop is
stopped), cpus (the quota is set); v2 refuses limits its hierarchy cannot enforce."""

from __future__ import annotations

from pathlib import Path

from runtime import cgroups
from tests.runtime.conftest import IMAGE, Strata


def test_memory_limit_kills_an_allocation_beyond_it(strata: Strata) -> None:
    res = strata("run", "--name", "hog", "-m", "32m", IMAGE, "sh", "-c",
                 "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived ${#x}", check=False)
    assert res.returncode == 137, res
    assert "survived" not in res.stdout
    assert strata.inspect("hog")["State"]["OOMKilled"] is True
    small = strata("run", "--rm", "-m", "32m", IMAGE, "sh", "-c",
                   "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ${#x}")
    assert small.stdout == "1000000\n"


def test_pids_limit_stops_a_fork_loop(strata: Strata) -> None:
    out = strata("run", "--rm", "--pids-limit", "10", IMAGE, "sh", "-c",
                 "for i in $(seq 1 40); do sleep 30 & done; echo loop over", check=False)
    assert "can't fork" in out.stderr or "Resource temporarily unavailable" in out.stderr, out
    assert "loop over" not in out.stdout  # busybox sh gives up at the first failed fork
    out = strata("run", "--rm", "--pids-limit", "50", IMAGE, "sh", "-c",
                 "for i in $(seq 1 40); do sleep 1 & done; wait; echo loop over")
    assert out.stdout == "loop over\n"  # the same loop under a higher limit


def test_cpu_quota_and_memory_are_written(strata: Strata) -> None:
    cid = strata.run_d("--cpus", "0.5", "-m", "64m", IMAGE, "sleep", "300")
    mounts = cgroups.v1_mounts()
    quota = Path(mounts["cpu"] / "strata" / cid / "cpu.cfs_quota_us").read_text()
    assert int(quota) == 50000
    limit = Path(mounts["memory"] / "strata" / cid / "memory.limit_in_bytes").read_text()
    assert int(limit) == 64 * 1024 * 1024
    pids = Path(mounts["pids"] / "strata" / cid / "cgroup.procs").read_text().split()
    assert str(strata.inspect(cid)["State"]["Pid"]) in pids


def test_v2_refuses_limits_it_cannot_enforce_and_runs_without(strata: Strata) -> None:
    v2 = cgroups.v2_mount()
    assert v2 is not None, "this machine should have a cgroup2 mount"
    available = (v2 / "cgroup.controllers").read_text().split()
    env = {"STRATA_CGROUP": "v2"}
    if "memory" not in available:
        res = strata("run", "--rm", "-m", "32m", IMAGE, "true", check=False, env=env)
        assert res.returncode == 1 and "no memory controller" in res.stderr
    cid = strata.run_d(IMAGE, "sleep", "300", env=env)
    procs = (v2 / "strata" / cid / "cgroup.procs").read_text().split()
    assert str(strata.inspect(cid)["State"]["Pid"]) in procs
