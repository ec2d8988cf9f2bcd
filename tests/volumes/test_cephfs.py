"""Shared volumes on CephFS through the plugin protocol: two "hosts" (a `strata serve`
each, own state root and mounts) against one real single-node Ceph cluster, and the
faults: kill -9 of ceph-fuse and of the service, a reboot, an MDS restart, an
unreachable cluster, Create/Remove racing from both hosts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.ceph import Cluster
from benchmarks.processes import pids_mentioning
from common import kernel

from .conftest import SHARED_TIMEOUT, SharedHost

pytestmark = pytest.mark.timeout(600)
CREATE, REMOVE, MOUNT, UNMOUNT = ("/VolumeDriver.Create", "/VolumeDriver.Remove", "/VolumeDriver.Mount",
                                  "/VolumeDriver.Unmount")
GET, LIST = "/VolumeDriver.Get", "/VolumeDriver.List"
# A call on an unreachable cluster must end well before Docker gives up; the service's own
# bound is a few times the configured timeout.
CALL_BOUND = SHARED_TIMEOUT * 4 + 10


@pytest.fixture(scope="module")
def hosts(make_host: Callable[..., SharedHost]) -> tuple[SharedHost, SharedHost]:
    return make_host("a"), make_host("b")


def names(h: SharedHost) -> list[str]:
    return sorted(v["Name"] for v in h.ok(LIST)["Volumes"])


def status(h: SharedHost, name: str) -> dict[str, Any]:
    out: dict[str, Any] = h.ok(GET, {"Name": name})["Volume"]["Status"]
    return out


def ceph_fuse_pid(h: SharedHost, name: str) -> int:
    tag = h.host_record(name)["Tag"]
    pids = list(pids_mentioning(f"strata_mount={tag}"))
    assert len(pids) == 1, pids
    return pids[0]


def test_capabilities_scope_global(hosts: tuple[SharedHost, SharedHost]) -> None:
    a, _ = hosts
    assert a.ok("/VolumeDriver.Capabilities") == {"Capabilities": {"Scope": "global"}}
    assert a.ok("/Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    # The local plugin of the same service is unchanged.
    assert a.call("/VolumeDriver.Capabilities") == {"Capabilities": {"Scope": "local"}}


def test_created_on_a_is_listed_mounted_and_read_on_b(hosts: tuple[SharedHost, SharedHost]) -> None:
    a, b = hosts
    a.ok(CREATE, {"Name": "x1", "Opts": {"uid": "1000", "gid": "1001", "mode": "0750"}})
    assert "x1" in names(b)
    assert status(b, "x1")["MountCount"] == 0 and status(b, "x1")["MountedOn"] == []
    assert a.ok(MOUNT, {"Name": "x1", "ID": "m-a"})["Mountpoint"] == str(a.mountpoint("x1"))
    (a.mountpoint("x1") / "hello").write_text("from host a\n")
    assert b.ok(MOUNT, {"Name": "x1", "ID": "m-b"})["Mountpoint"] == str(b.mountpoint("x1"))
    assert (b.mountpoint("x1") / "hello").read_text() == "from host a\n"
    st = os.stat(b.mountpoint("x1"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1001, 0o750)
    assert a.mountpoint("x1") != b.mountpoint("x1")
    hosts_using = status(a, "x1")["MountedOn"]
    assert len(hosts_using) == 2 and status(b, "x1")["Host"] in hosts_using
    # Remove is refused while either host has it mounted, from either host.
    for h in (a, b):
        err = h.scall(REMOVE, {"Name": "x1"})["Err"]
        assert "in use" in err
    a.ok(UNMOUNT, {"Name": "x1", "ID": "m-a"})
    assert "in use on host(s)" in a.scall(REMOVE, {"Name": "x1"})["Err"]
    assert (b.mountpoint("x1") / "hello").read_text() == "from host a\n"
    b.ok(UNMOUNT, {"Name": "x1", "ID": "m-b"})
    assert not os.path.ismount(b.mountpoint("x1"))
    b.ok(REMOVE, {"Name": "x1"})
    assert "x1" not in names(a) and "x1" not in names(b)
    assert "no such volume" in a.scall(GET, {"Name": "x1"})["Err"]


def test_same_create_twice_is_a_no_op_and_different_options_are_refused(
    hosts: tuple[SharedHost, SharedHost],
) -> None:
    a, b = hosts
    a.ok(CREATE, {"Name": "x2", "Opts": {"size": "8m"}})
    b.ok(CREATE, {"Name": "x2", "Opts": {"size": "8m"}})
    assert "different options" in b.scall(CREATE, {"Name": "x2", "Opts": {"size": "9m"}})["Err"]
    assert "unknown option" in b.scall(CREATE, {"Name": "x3", "Opts": {"colour": "red"}})["Err"]
    assert "invalid volume name" in b.scall(CREATE, {"Name": "../x"})["Err"]
    assert "type=cephfs" in b.scall(CREATE, {"Name": "x3", "Opts": {"type": "tmpfs"}})["Err"]
    assert "x3" not in names(a)
    a.ok(REMOVE, {"Name": "x2"})


def test_quota_is_enforced_by_ceph_fuse(hosts: tuple[SharedHost, SharedHost]) -> None:
    """size= is ceph.quota.max_bytes; ceph-fuse answers EDQUOT (not ENOSPC), a little late:
    the client checks against what the MDS last told it (a 10 MiB quota took 10-11 MiB)."""
    a, b = hosts
    a.ok(CREATE, {"Name": "q1", "Opts": {"size": "10m"}})
    assert status(b, "q1")["SizeLimit"] == 10 << 20
    b.ok(MOUNT, {"Name": "q1", "ID": "q"})
    written = 0
    with pytest.raises(OSError) as exc, open(b.mountpoint("q1") / "fill", "wb") as f:
        for _ in range(64):
            written += f.write(b"\1" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    assert exc.value.errno == errno.EDQUOT
    assert 10 << 20 <= written <= 16 << 20
    b.ok(UNMOUNT, {"Name": "q1", "ID": "q"})
    assert status(a, "q1")["Size"] >= 10 << 20  # CephFS's recursive byte count
    a.ok(REMOVE, {"Name": "q1"})


def test_kill9_of_ceph_fuse_is_repaired_by_the_next_mount(hosts: tuple[SharedHost, SharedHost]) -> None:
    a, b = hosts
    a.ok(CREATE, {"Name": "k1"})
    a.ok(MOUNT, {"Name": "k1", "ID": "c1"})
    # Held open across the crash, so the dead client holds its caps; fsynced, since what a
    # killed ceph-fuse still buffered is lost with it.
    f = open(a.mountpoint("k1") / "data", "w")  # noqa: SIM115
    f.write("before the crash\n")
    f.flush()
    os.fsync(f.fileno())
    os.kill(ceph_fuse_pid(a, "k1"), signal.SIGKILL)
    time.sleep(0.5)
    with pytest.raises(OSError) as exc:
        os.listdir(a.mountpoint("k1"))
    assert exc.value.errno == errno.ENOTCONN
    with contextlib.suppress(OSError):
        f.close()
    a.ok(MOUNT, {"Name": "k1", "ID": "c2"})
    assert (a.mountpoint("k1") / "data").read_text() == "before the crash\n"
    st = status(a, "k1")
    assert st["MountCount"] == 2
    assert "detached a dead ceph-fuse mount, evicted its session, mounted again" in st["Note"]
    # The other host is not held up by the dead client's capabilities (evicted, not timed out).
    b.ok(MOUNT, {"Name": "k1", "ID": "cb"})
    t0 = time.monotonic()
    (b.mountpoint("k1") / "data").write_text("b after the crash\n")
    print(f"[ceph] write on host b after host a's ceph-fuse was replaced: {time.monotonic() - t0:.2f} s")
    assert (a.mountpoint("k1") / "data").read_text() == "b after the crash\n"
    for h, ids in ((a, ("c1", "c2")), (b, ("cb",))):
        for i in ids:
            h.ok(UNMOUNT, {"Name": "k1", "ID": i})
    a.ok(REMOVE, {"Name": "k1"})


def test_kill9_of_the_service_keeps_volumes_and_references(hosts: tuple[SharedHost, SharedHost]) -> None:
    a, b = hosts
    a.ok(CREATE, {"Name": "s1"})
    a.ok(MOUNT, {"Name": "s1", "ID": "keep"})
    with open(a.mountpoint("s1") / "f", "w") as f:  # what ceph-fuse buffered dies with it
        f.write("kept\n")
        f.flush()
        os.fsync(f.fileno())
    a.kill9()
    # While the service is down its ceph-fuse dies too: the restart must mount it again.
    os.kill(ceph_fuse_pid(a, "s1"), signal.SIGKILL)
    a.start()
    assert "s1" in names(a)
    st = status(a, "s1")
    assert st["MountCount"] == 1 and "on recovery" in st["Note"]
    assert (a.mountpoint("s1") / "f").read_text() == "kept\n"
    assert "in use on host(s)" in b.scall(REMOVE, {"Name": "s1"})["Err"]
    a.ok(UNMOUNT, {"Name": "s1", "ID": "keep"})
    b.ok(REMOVE, {"Name": "s1"})


def test_references_from_before_a_reboot_are_dropped(hosts: tuple[SharedHost, SharedHost]) -> None:
    """A reboot kills the containers without Unmount: their references must not keep the
    volume in use on any host."""
    a, b = hosts
    a.ok(CREATE, {"Name": "r1"})
    a.ok(MOUNT, {"Name": "r1", "ID": "old"})
    a.kill9()
    rec = a.host_record("r1")
    os.kill(ceph_fuse_pid(a, "r1"), signal.SIGKILL)  # what a reboot does to the mount ...
    kernel.umount(a.mountpoint("r1"), kernel.MNT_DETACH)
    rec["Boot"] = "an-earlier-boot"  # ... and to the boot id
    (a.shared_root / "r1" / "host.json").write_text(json.dumps(rec))
    a.start()
    st = status(a, "r1")
    assert st["MountCount"] == 0 and "from before a reboot dropped" in st["Note"]
    assert st["MountedOn"] == []
    b.ok(REMOVE, {"Name": "r1"})


def test_mds_restart(hosts: tuple[SharedHost, SharedHost], ceph: Cluster) -> None:
    a, b = hosts
    a.ok(CREATE, {"Name": "m1"})
    a.ok(MOUNT, {"Name": "m1", "ID": "x"})
    (a.mountpoint("m1") / "f").write_text("one\n")
    ceph.restart_mds()
    (a.mountpoint("m1") / "f").write_text("two\n")  # the client reconnects to the new MDS
    b.ok(MOUNT, {"Name": "m1", "ID": "y"})
    assert (b.mountpoint("m1") / "f").read_text() == "two\n"
    b.ok(CREATE, {"Name": "m2"})
    assert {"m1", "m2"} <= set(names(a))
    a.ok(UNMOUNT, {"Name": "m1", "ID": "x"})
    b.ok(UNMOUNT, {"Name": "m1", "ID": "y"})
    for n in ("m1", "m2"):
        a.ok(REMOVE, {"Name": n})


def _timed_err(h: SharedHost, endpoint: str, body: dict[str, Any]) -> tuple[str, float]:
    t0 = time.monotonic()
    out = h.scall(endpoint, body)
    took = time.monotonic() - t0
    assert "Err" in out, out
    err: str = out["Err"]
    assert "\n" not in err
    return err, took


def test_unreachable_cluster_answers_err_in_bounded_time(
    hosts: tuple[SharedHost, SharedHost], ceph: Cluster, make_host: Callable[..., SharedHost],
) -> None:
    a, b = hosts
    a.ok(CREATE, {"Name": "u1"})
    b.ok(CREATE, {"Name": "u2"})
    ceph.pause()  # every daemon stopped: a partition, seen from the clients
    try:
        for endpoint, body in ((MOUNT, {"Name": "u1", "ID": "u"}), (GET, {"Name": "u2"})):
            err, took = _timed_err(a, endpoint, body)
            print(f"[ceph] {endpoint} on a paused cluster: {took:.1f} s: {err}")
            assert "did not answer within" in err and took < CALL_BOUND
        # A volume this host knows still answers Get (Docker would take an Err for "unknown"
        # and make a local volume of that name), from this host's copy of the record.
        vol = a.ok(GET, {"Name": "u1"})["Volume"]
        assert vol["Name"] == "u1" and "last copy of the record" in vol["Status"]["Note"]
        assert a.call("/VolumeDriver.List") == {"Volumes": []}  # the local plugin is not held up
    finally:
        ceph.resume()
    b.ok(REMOVE, {"Name": "u2"})
    # The Mount that answered Err took no reference when the cluster came back.
    assert status(a, "u1")["MountCount"] == 0
    a.ok(MOUNT, {"Name": "u1", "ID": "u"})
    a.ok(UNMOUNT, {"Name": "u1", "ID": "u"})
    a.ok(REMOVE, {"Name": "u1"})
    # A host whose config names no live monitor: it starts (Docker's restore-time calls
    # get answers) and every shared call fails with one line in bounded time.
    c = make_host("c", monitors="127.0.0.1:9")
    err, took = _timed_err(c, CREATE, {"Name": "u3"})
    print(f"[ceph] Create with no monitor reachable: {took:.1f} s: {err}")
    assert "cannot mount CephFS" in err and took < CALL_BOUND


def test_concurrent_create_and_remove_from_both_hosts(hosts: tuple[SharedHost, SharedHost]) -> None:
    """Both hosts create, then remove, the same names at once, round after round: every
    create succeeds (the loser finds the winner's identical volume), each remove succeeds
    on exactly one host, and nothing is lost, duplicated or left half-made."""
    a, b = hosts
    batch = [f"cc{i}" for i in range(4)]

    def run_all(endpoint: str) -> dict[tuple[str, str], dict[str, Any]]:
        results: dict[tuple[str, str], dict[str, Any]] = {}

        def worker(h: SharedHost, label: str, name: str) -> None:
            results[(label, name)] = h.scall(endpoint, {"Name": name, "Opts": {"size": "4m"}})

        threads = [threading.Thread(target=worker, args=(h, label, n))
                   for n in batch for h, label in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    for _ in range(3):
        created = run_all(CREATE)
        assert all("Err" not in r for r in created.values()), created
        assert set(batch) <= set(names(a)) and names(a) == names(b)
        removed = run_all(REMOVE)
        for n in batch:
            oks = [lbl for lbl in "ab" if "Err" not in removed[(lbl, n)]]
            assert len(oks) == 1, (n, removed)
            other = "b" if oks == ["a"] else "a"
            assert "no such volume" in removed[(other, n)]["Err"]
        assert not set(batch) & set(names(b))
    leftovers = [e for e in os.listdir(a.shared_root / ".cluster") if e.startswith((".new-", ".trash-"))]
    assert leftovers == []


def test_mount_racing_remove_never_both_succeed(hosts: tuple[SharedHost, SharedHost]) -> None:
    a, b = hosts
    for i in range(4):
        name = f"mr{i}"
        a.ok(CREATE, {"Name": name})
        out: dict[str, dict[str, Any]] = {}

        def call(key: str, h: SharedHost, endpoint: str, body: dict[str, Any],
                 out: dict[str, dict[str, Any]] = out) -> None:
            out[key] = h.scall(endpoint, body)

        threads = [threading.Thread(target=call, args=("m", a, MOUNT, {"Name": name, "ID": "r"})),
                   threading.Thread(target=call, args=("r", b, REMOVE, {"Name": name}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        mounted, removed = "Err" not in out["m"], "Err" not in out["r"]
        assert not (mounted and removed), out
        if mounted:
            assert Path(out["m"]["Mountpoint"]).is_dir()
            a.ok(UNMOUNT, {"Name": name, "ID": "r"})
        if not removed:
            a.ok(REMOVE, {"Name": name})
        assert name not in names(b)
