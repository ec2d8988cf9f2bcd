"""`strata snapshotter` over gRPC, as containerd's proxy client calls it: every RPC, the
statuses containerd's errdefs map back, hostile requests, concurrency, kill -9 and restart."""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from benchmarks import processes
from benchmarks.containerd import STRATA, Snapshotter
from plugin_api._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from plugin_api._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

Stub = pb_grpc.SnapshotsStub


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()  # type: ignore[no-any-return]


def _names(client: Stub, *filters: str) -> list[str]:
    return [i.name for r in client.List(pb.ListSnapshotsRequest(filters=filters)) for i in r.info]


def _listing(client: Stub) -> list[tuple[str, str, int, dict[str, str]]]:
    return [(i.name, i.parent, i.kind, dict(i.labels)) for r in client.List(pb.ListSnapshotsRequest())
            for i in r.info]


def test_every_call(client: Stub, snap: Snapshotter) -> None:
    r = client.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"containerd.io/gc.root": "1"}))
    (m,) = r.mounts
    assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
    Path(m.source, "file").write_text("hello")
    assert list(client.Mounts(pb.MountsRequest(key="a")).mounts) == [m]
    assert client.Usage(pb.UsageRequest(key="a")).inodes == 1
    client.Commit(pb.CommitSnapshotRequest(name="A", key="a", labels={"l": "v"}))
    info = client.Stat(pb.StatSnapshotRequest(key="A")).info
    assert (info.name, info.kind, dict(info.labels)) == ("A", pb.COMMITTED, {"l": "v"})
    assert info.created_at.seconds > 0 and info.updated_at.ToNanoseconds() >= info.created_at.ToNanoseconds()
    (m,) = client.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A")).mounts
    assert m.type == "fuse3.strata-unionfs" and m.options[0].startswith("lowerdir=")
    (v,) = client.View(pb.ViewSnapshotRequest(key="v", parent="A")).mounts
    assert (v.type, v.options[0]) == ("bind", "ro")
    up = client.Update(pb.UpdateSnapshotRequest(
        info=pb.Info(name="b", labels={"x": "1"}), update_mask=field_mask_pb2.FieldMask(paths=["labels.x"])))
    assert dict(up.info.labels) == {"x": "1"} and up.info.parent == "A"
    assert _names(client) == ["A", "b", "v"]
    assert _names(client, "kind==view", "labels.x==1") == ["b", "v"]
    client.Remove(pb.RemoveSnapshotRequest(key="v"))
    client.Remove(pb.RemoveSnapshotRequest(key="b"))
    client.Remove(pb.RemoveSnapshotRequest(key="A"))
    (snap.root / "snapshotter" / "snapshots" / "77").mkdir()  # a crash's leftover
    client.Cleanup(pb.CleanupRequest())
    assert _names(client) == [] and os.listdir(snap.root / "snapshotter" / "snapshots") == []


def test_statuses_containerd_maps_back(client: Stub) -> None:
    client.Prepare(pb.PrepareSnapshotRequest(key="a"))
    client.Commit(pb.CommitSnapshotRequest(name="A", key="a"))
    client.View(pb.ViewSnapshotRequest(key="v", parent="A"))
    client.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"))
    S = grpc.StatusCode
    cases = [
        (lambda: client.Stat(pb.StatSnapshotRequest(key="unknown")), S.NOT_FOUND),
        (lambda: client.Mounts(pb.MountsRequest(key="unknown")), S.NOT_FOUND),
        (lambda: client.Usage(pb.UsageRequest(key="unknown")), S.NOT_FOUND),
        (lambda: client.Remove(pb.RemoveSnapshotRequest(key="unknown")), S.NOT_FOUND),
        (lambda: client.Prepare(pb.PrepareSnapshotRequest(key="c", parent="no-such-parent")), S.NOT_FOUND),
        (lambda: client.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="unknown"))), S.NOT_FOUND),
        (lambda: client.Prepare(pb.PrepareSnapshotRequest(key="b")), S.ALREADY_EXISTS),
        (lambda: client.View(pb.ViewSnapshotRequest(key="A")), S.ALREADY_EXISTS),
        (lambda: client.Commit(pb.CommitSnapshotRequest(name="A", key="b")), S.ALREADY_EXISTS),
        (lambda: client.Commit(pb.CommitSnapshotRequest(name="V", key="v")), S.FAILED_PRECONDITION),
        (lambda: client.Remove(pb.RemoveSnapshotRequest(key="A")), S.FAILED_PRECONDITION),
        (lambda: client.Mounts(pb.MountsRequest(key="A")), S.FAILED_PRECONDITION),
        (lambda: client.Prepare(pb.PrepareSnapshotRequest(key="c", parent="b")), S.INVALID_ARGUMENT),
        (lambda: client.Prepare(pb.PrepareSnapshotRequest(key="")), S.INVALID_ARGUMENT),
        (lambda: client.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name="b"), update_mask=field_mask_pb2.FieldMask(paths=["kind"]))),
         S.INVALID_ARGUMENT),
        (lambda: list(client.List(pb.ListSnapshotsRequest(filters=["labels.x~=("]))), S.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        assert _code(call) == code
    assert _names(client) == ["A", "v", "b"]


def test_hostile_requests_never_take_it_down(client: Stub, snap: Snapshotter) -> None:
    S = grpc.StatusCode
    huge = {"k": "v" * (5 << 20)}  # over the 4 MiB message bound: grpcio refuses it unread
    too_big = _code(lambda: client.Prepare(pb.PrepareSnapshotRequest(key="a", labels=huge)))
    assert too_big == S.RESOURCE_EXHAUSTED
    for key in ("x\0y", "k" * 5000):
        assert _code(lambda k=key: client.Prepare(pb.PrepareSnapshotRequest(key=k))) == S.INVALID_ARGUMENT
    for labels in ({"k": "v" * 4096}, {"": "v"}, {f"l{i}": "" for i in range(600)}):
        assert _code(lambda lb=labels: client.Prepare(
            pb.PrepareSnapshotRequest(key="a", labels=lb))) == S.INVALID_ARGUMENT
    # Keys that look like paths are only keys.
    for key in ("../../../../etc", "/etc/passwd", "a/../../b"):
        (m,) = client.Prepare(pb.PrepareSnapshotRequest(key=key)).mounts
        assert Path(m.source).parent.parent == snap.root / "snapshotter" / "snapshots"
    # Garbage bytes on the socket: the server drops that connection and keeps serving.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(snap.address))
        s.sendall(os.urandom(4096))
    assert _names(client) == ["../../../../etc", "/etc/passwd", "a/../../b"]
    assert snap.proc is not None and snap.proc.poll() is None


def test_concurrent_clients_leave_exact_state(client: Stub) -> None:
    client.Prepare(pb.PrepareSnapshotRequest(key="base"))
    client.Commit(pb.CommitSnapshotRequest(name="BASE", key="base"))

    def work(i: int) -> None:
        for j in range(5):
            key = f"c{i}-{j}"
            client.Prepare(pb.PrepareSnapshotRequest(key=key, parent="BASE", labels={"i": str(i)}))
            if j % 2:
                client.Remove(pb.RemoveSnapshotRequest(key=key))
            else:
                client.Commit(pb.CommitSnapshotRequest(name=f"C{i}-{j}", key=key))
        # everyone races for the same key: exactly one wins
        try:
            client.Prepare(pb.PrepareSnapshotRequest(key="contended"))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(16)))
    names = _names(client)
    committed = [f"C{i}-{j}" for i in range(16) for j in (0, 2, 4)]
    assert sorted(names) == sorted(["BASE", "contended", *committed])
    assert len(_names(client, "parent==BASE")) == 48


def test_kill9_and_restart_keep_every_snapshot(client: Stub, snap: Snapshotter) -> None:
    client.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"l": "1"}))
    client.Commit(pb.CommitSnapshotRequest(name="A", key="a", labels={"l": "1"}))
    client.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"))
    before = _listing(client)
    snap.kill9()
    assert stat.S_ISSOCK(os.lstat(snap.address).st_mode)  # the dead one's socket stays
    assert _code(lambda: client.Stat(pb.StatSnapshotRequest(key="A"))) == grpc.StatusCode.UNAVAILABLE
    (snap.root / "snapshotter" / "snapshots" / "12345").mkdir()  # a prepare the kill cut short
    snap.start()  # takes over the stale socket, removes the leftover
    assert _listing(client) == before
    assert not (snap.root / "snapshotter" / "snapshots" / "12345").exists()
    assert client.Mounts(pb.MountsRequest(key="b")).mounts[0].type == "fuse3.strata-unionfs"


def test_kill9_under_load_leaves_consistent_state(client: Stub, snap: Snapshotter) -> None:
    """A kill -9 in the middle of prepares, commits and removals: after the restart every
    snapshot listed has its directory, and no directory is left without a snapshot."""
    client.Prepare(pb.PrepareSnapshotRequest(key="base"))
    client.Commit(pb.CommitSnapshotRequest(name="BASE", key="base"))
    stop = threading.Event()
    done = [0]

    def churn(i: int) -> None:
        n = 0
        while not stop.is_set():
            key = f"w{i}-{n}"
            try:
                client.Prepare(pb.PrepareSnapshotRequest(key=key, parent="BASE"))
                if n % 2:
                    client.Remove(pb.RemoveSnapshotRequest(key=key))
                else:
                    client.Commit(pb.CommitSnapshotRequest(name=key.upper(), key=key))
                done[0] += 1
            except grpc.RpcError:
                return  # the server is gone
            n += 1

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while done[0] < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    snap.kill9()
    stop.set()
    for t in threads:
        t.join(30)
    snap.start()
    infos = [i for r in client.List(pb.ListSnapshotsRequest()) for i in r.info]
    assert len(infos) > 1
    store = snap.root / "snapshotter"
    db = sqlite3.connect(store / "metadata.db")
    try:
        ids = {str(i) for (i,) in db.execute("SELECT id FROM snapshots")}
    finally:
        db.close()
    assert len(ids) == len(infos)
    assert set(os.listdir(store / "snapshots")) == ids
    for i in ids:
        assert sorted(os.listdir(store / "snapshots" / i)) == ["fs", "work"]


def test_undecodable_requests_answered_not_crashed(snap: Snapshotter, client: Stub) -> None:
    """Bytes that are not the request message (or not UTF-8 where a string is due) on every
    method: an error status, and the server keeps answering."""
    with grpc.insecure_channel(f"unix:{snap.address}") as ch:
        for method in ("Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage", "Cleanup"):
            call = ch.unary_unary(f"/containerd.services.snapshots.v1.Snapshots/{method}",
                                  request_serializer=None, response_deserializer=None)
            for raw in (b"\x12\x02\xff\xfe", b"\xff" * 64, os.urandom(512)):
                try:
                    call(raw, timeout=10)
                except grpc.RpcError as e:
                    assert e.code() != grpc.StatusCode.UNAVAILABLE
    client.Prepare(pb.PrepareSnapshotRequest(key="still-here"))
    assert snap.proc is not None and snap.proc.poll() is None


def test_socket_is_root_only_and_not_shared(snap: Snapshotter) -> None:
    assert stat.S_IMODE(os.stat(snap.address).st_mode) == 0o600
    res = subprocess.run([STRATA, "snapshotter", "--root", str(snap.root), "--address", str(snap.address)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "already listening" in res.stderr
    res = subprocess.run([STRATA, "snapshotter", "--address", "relative.sock"], capture_output=True,
                         text=True)
    assert res.returncode == 1 and "absolute" in res.stderr


def _exit_status(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then its exit status within 30 s; None (and SIGKILL) if it hangs."""
    return processes.stop(proc, 30)


def test_tells_systemd_once_it_listens(tmp_path: Path) -> None:
    """Type=notify (plugin_api/strata-snapshotter.service): READY=1 only once the socket listens."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    address = tmp_path / "s.sock"
    argv = [STRATA, "snapshotter", "--root", str(tmp_path / "state"), "--address", str(address)]
    proc = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
                            stderr=subprocess.DEVNULL)
    try:
        assert notify.recv(100) == b"READY=1"
        assert stat.S_ISSOCK(os.lstat(address).st_mode)
    finally:
        assert _exit_status(proc) == 0
        notify.close()


def test_sigterm_stops_cleanly_even_mid_calls(snap: Snapshotter) -> None:
    """SIGTERM reaches the server whichever of its threads the kernel hands it to, with
    calls in flight; it exits 0 and removes its socket, round after round."""
    for round_ in range(5):
        if round_:
            snap.start()
        assert snap.proc is not None
        with grpc.insecure_channel(f"unix:{snap.address}") as ch:
            stub = Stub(ch)
            with ThreadPoolExecutor(4) as pool:
                calls = [pool.submit(stub.Prepare, pb.PrepareSnapshotRequest(key=f"r{round_}-{i}"))
                         for i in range(40)]
                time.sleep(0.02 * round_)
                status = _exit_status(snap.proc)
                for c in calls:
                    if c.exception() is not None:
                        assert isinstance(c.exception(), grpc.RpcError)
        snap.proc = None
        assert status == 0
        assert not snap.address.exists()
