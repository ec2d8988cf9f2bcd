"""Fixtures for the GraphDriver tests: a real `strata serve` process (killed -9 and
restarted by some tests) on a private state root, spoken to as dockerd speaks to it."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.volumes.conftest import Env, Service, serving
from volumes.state import remove_tree


class GraphService(Service):
    """`strata serve` with the GraphDriver calls dockerd makes, raw tars in and out."""

    @property
    def layers(self) -> Path:
        return self.env.root / "graph" / "layers"

    def graph(self, call: str, **fields: Any) -> dict[str, Any]:
        return self.call(f"/GraphDriver.{call}", fields)

    def apply_diff(self, layer: str, parent: str, tar: bytes) -> dict[str, Any]:
        query = urllib.parse.urlencode({"id": layer, "parent": parent})
        status, raw = self.raw(f"/GraphDriver.ApplyDiff?{query}", tar)
        assert status == 200, (status, raw)
        out: dict[str, Any] = json.loads(raw)
        return out

    def diff(self, layer: str, parent: str = "") -> tuple[int, bytes]:
        return self.raw("/GraphDriver.Diff", json.dumps({"ID": layer, "Parent": parent}).encode())

    def record(self, layer: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads((self.layers / layer / "layer.json").read_text())
        return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    config = tmp_path / "volumes.json"
    config.write_text("{}")
    try:
        yield Env(tmp_path / "state", config, tmp_path)
    finally:
        remove_tree(tmp_path)  # detaches any layer mount a failed test left


@pytest.fixture
def service(env: Env, tmp_path: Path) -> Iterator[GraphService]:
    with serving(GraphService, env, tmp_path) as svc:
        yield svc

