"""Fixtures for the snapshotter tests: a real `strata snapshotter` process (so it can be
killed -9 and restarted) and a gRPC client of it, as containerd's proxy speaks to it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from benchmarks.containerd import Snapshotter, running_snapshotter
from plugin_api._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc


@pytest.fixture
def snap() -> Iterator[Snapshotter]:
    with running_snapshotter() as s:
        yield s


@pytest.fixture
def client(snap: Snapshotter) -> Iterator[pb_grpc.SnapshotsStub]:
    channel = grpc.insecure_channel(f"unix:{snap.address}")
    try:
        yield pb_grpc.SnapshotsStub(channel)
    finally:
        channel.close()
