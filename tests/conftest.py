"""What every test session shares: the mount service that `strata-unionfs` starts
on demand (unionfs.service) is stopped when the session ends, so a test run leaves
no process behind; mounts it made are their own daemons and are unmounted by the
tests that made them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from unionfs import service


@pytest.fixture(scope="session", autouse=True)
def _stop_mount_service() -> Iterator[None]:
    yield
    service.stop()
