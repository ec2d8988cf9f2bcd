"""Fixtures for the layer store tests: a private store root and the CLI run in-process."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from images.digest import sha256_bytes
from images.store import LayerSource, Store
from runtime.cli import main
from tests.store.helpers import TarBuilder


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state")


@pytest.fixture
def fresh(tmp_path: Path) -> Store:
    """A second, empty store: where images go back in after a trip through another tool."""
    return Store(tmp_path / "fresh")


def _sample_layers() -> list[bytes]:
    base = TarBuilder().dir("bin").file("bin/tool", os.urandom(200_000), mode=0o755).dir("etc")
    base.file("etc/conf", b"a=1\n").dir("var").dir("var/lib").file("var/lib/state", b"old")
    mid = TarBuilder().dir("etc").file("etc/.wh.conf", b"").file("etc/new", b"b=2\n")
    mid.symlink("link", "bin/tool")
    top = TarBuilder().dir("var").dir("var/lib").file("var/lib/.wh..wh..opq", b"").file("var/lib/fresh", b"f")
    top.dir("bin").file("bin/tool2", b"t2")
    return [base.bytes(), mid.bytes(), top.bytes()]


@pytest.fixture
def sample(store: Store) -> str:
    """`sample:v1`, three layers with a whiteout, an opaque dir and mixed compression."""
    tars = _sample_layers()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Cmd": ["/bin/tool"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_bytes(t) for t in tars]},
        "history": [{"created_by": f"step {i}"} for i in range(3)],
    }).encode()
    blobs = [gzip.compress(tars[0]), tars[1], tars[2]]
    sources = [LayerSource(lambda b=b: io.BytesIO(b), None, len(b)) for b in blobs]  # type: ignore[misc]
    return store.add_image(config, sources, ["sample:v1"])


class CLIResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def strata(store: Store, capsys: pytest.CaptureFixture[str]) -> Callable[..., CLIResult]:
    """Run `strata --root <store> ARGS...`; fails the test on a non-zero exit unless check=False."""

    def run(*args: str, check: bool = True) -> CLIResult:
        capsys.readouterr()
        code = main(["--root", str(store.root), *args])
        captured = capsys.readouterr()
        result = CLIResult(code, captured.out, captured.err)
        if check and code != 0:
            raise AssertionError(f"strata {' '.join(args)} exited {code}: {captured.err}")
        return result

    return run
