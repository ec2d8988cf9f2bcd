"""containerd's snapshots gRPC API (`containerd.services.snapshots.v1.Snapshots`) over a
`snapshot_store.SnapshotStore`: strata as a proxy snapshotter.

grpcio's synchronous server with a small thread pool: each call is a short SQLite
transaction plus at most a mkdir, a tree removal or a disk-usage walk, all blocking calls,
so threads fit better than an event loop. Store errors become the gRPC statuses containerd's
errdefs package maps back to its own errors (NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument); anything unexpected is logged and answered as Internal, never left to
take the server down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from common.errors import StrataError
from common.paths import private_dir

from . import snapshot_store as st
from ._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ._proto.containerd.types import mount_pb2
from .sockets import claim_socket, notify_systemd

log = logging.getLogger("strata.snapshotter")

# containerd batches Walk results; so do we (its own server sends 100 per message).
LIST_BATCH = 100
# A request larger than this is refused by grpcio before it reaches us: keys and labels
# are bounded far below it (snapshot_store), so only a hostile client hits it.
MAX_MESSAGE = 4 << 20
WORKERS = 8
# Calls waiting for a worker beyond this are refused (RESOURCE_EXHAUSTED) instead of queued
# without bound: containerd sends a few at a time; a flood is a hostile or broken client.
MAX_PENDING = 512

_CODES: list[tuple[type[StrataError], grpc.StatusCode]] = [
    (st.NotFound, grpc.StatusCode.NOT_FOUND),
    (st.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (st.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (st.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
]

T = TypeVar("T")


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(info: st.Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=pb.Kind.Name(info.kind),
                   created_at=_timestamp(info.created_ns), updated_at=_timestamp(info.updated_ns),
                   labels=info.labels)


def _mounts(mounts: list[st.Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """One method per RPC; `_call` turns the store's errors into statuses."""

    def __init__(self, store: st.SnapshotStore) -> None:
        self.store = store

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        log.debug("%s", what)
        try:
            return fn()
        except StrataError as e:
            code = next((c for cls, c in _CODES if isinstance(e, cls)), grpc.StatusCode.INVALID_ARGUMENT)
            log.debug("%s: %s: %s", what, code.name, e)
            context.abort(code, str(e))
        except OSError as e:
            log.error("%s: %s", what, e)
            context.abort(grpc.StatusCode.INTERNAL, f"{what}: {e.strerror or e}")
        except Exception as e:
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.INTERNAL, f"{what}: {type(e).__name__}: {e}")
        raise AssertionError("unreachable: abort raises")

    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, f"prepare {request.key!r} parent {request.parent!r}",
                            lambda: self.store.prepare(request.key, request.parent, dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, f"view {request.key!r} parent {request.parent!r}",
                            lambda: self.store.prepare(request.key, request.parent, dict(request.labels),
                                                       view=True))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, f"mounts {request.key!r}", lambda: self.store.mounts(request.key))
        return pb.MountsResponse(mounts=_mounts(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> Any:
        self._call(context, f"commit {request.key!r} as {request.name!r}",
                   lambda: self.store.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> Any:
        self._call(context, f"remove {request.key!r}", lambda: self.store.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> Any:
        info = self._call(context, f"stat {request.key!r}", lambda: self.store.stat(request.key))
        return pb.StatSnapshotResponse(info=_info(info))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths)
        info = self._call(context, f"update {request.info.name!r} {paths}",
                          lambda: self.store.update(request.info.name, dict(request.info.labels), paths))
        return pb.UpdateSnapshotResponse(info=_info(info))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        infos = self._call(context, f"walk {list(request.filters)}",
                           lambda: list(self.store.walk(list(request.filters))))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info(x) for x in infos[i:i + LIST_BATCH]])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> Any:
        usage = self._call(context, f"usage {request.key!r}", lambda: self.store.usage(request.key))
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> Any:
        removed = self._call(context, "cleanup", self.store.cleanup)
        if removed:
            log.info("cleanup removed %d leftover snapshot directories", len(removed))
        return empty_pb2.Empty()


class SnapshotterServer:
    """The gRPC server on a unix socket (mode 0600) until stopped."""

    def __init__(self, store: st.SnapshotStore, address: Path, workers: int = WORKERS) -> None:
        self.store, self.address, self.workers = store, address, workers
        self._server: grpc.Server | None = None

    def start(self) -> None:
        """Listen. grpc.server() starts grpcio's threads, which inherit the calling thread's
        signal mask: run_until_signalled blocks SIGTERM and SIGINT before."""
        if not self.address.parent.exists():
            private_dir(self.address.parent)
        claim_socket(self.address)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="snapshots"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE)],
            maximum_concurrent_rpcs=MAX_PENDING,
        )
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(self.store), server)
        old = os.umask(0o177)  # the socket is born 0600: no window in which others connect
        try:
            if server.add_insecure_port(f"unix:{self.address}") == 0:
                raise StrataError(f"cannot listen on {self.address}")
            server.start()
        finally:
            os.umask(old)
        self._server = server
        os.chmod(self.address, 0o600)
        notify_systemd(b"READY=1")

    def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)

    def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT. The signals are blocked in every thread and taken
        with sigwait: a Python handler would only run once the main thread runs again, and
        the kernel may hand a process-wide SIGTERM to one of grpcio's threads while the main
        thread sleeps in a wait that nothing then wakes (seen: a server that ignored SIGTERM)."""
        signals = {signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            removed = self.store.cleanup()
            if removed:
                log.info("removed %d leftover snapshot directories", len(removed))
            self.start()
            log.info("serving containerd snapshots on %s (state %s)", self.address, self.store.root)
            signum = signal.sigwait(signals)
            log.info("%s: stopping", signal.Signals(signum).name)
        finally:
            self.stop()
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
