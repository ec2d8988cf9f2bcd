"""podman (containers-storage, Debian 4.3) as a second real client of strata's archives:
what strata saves podman loads, and what podman saves (docker-archive and oci-archive) strata
loads back to the same layers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from images import formats
from images.store import Store
from tests.store.helpers import image_view


class Podman:
    """podman on a private vfs graph root: load/save need no mount program."""

    def __init__(self, root: Path) -> None:
        conf = root / "storage.conf"
        conf.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{root / "graph"}"\nrunroot = "{root / "run"}"\n'
        )
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}

    def __call__(self, *args: str) -> str:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stderr.strip()}"
        return r.stdout


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    if shutil.which("podman") is None:
        pytest.fail("podman is missing: `make test` installs Debian's podman")
    root = tmp_path / "podman"
    root.mkdir()
    p = Podman(root)
    try:
        yield p
    finally:
        subprocess.run(["podman", "rmi", "--all", "--force"], env=p.env, capture_output=True, timeout=180)


def test_strata_to_podman_and_back(
    store: Store, sample: str, fresh: Store, podman: Podman, strata: Callable[..., Any], tmp_path: Path
) -> None:
    strata("save", "-o", str(tmp_path / "strata.tar"), "sample:v1")
    assert "Loaded image: localhost/sample:v1" in podman("load", "-i", str(tmp_path / "strata.tar"))
    inspected = json.loads(podman("image", "inspect", "localhost/sample:v1"))[0]
    diff_ids = store.image(sample).config["rootfs"]["diff_ids"]
    assert inspected["Id"] == sample[7:] and inspected["RootFS"]["Layers"] == diff_ids

    reference = image_view(store, sample, tmp_path / "m0")
    for fmt in ("docker-archive", "oci-archive"):
        out = tmp_path / f"{fmt}.tar"
        podman("save", "--format", fmt, "-o", str(out), "localhost/sample:v1")
        [(image_id, tags)] = formats.load(fresh, out)
        assert fresh.image(image_id).config["rootfs"]["diff_ids"] == diff_ids
        assert tags == ["localhost/sample:v1"]
        assert image_view(fresh, image_id, tmp_path / f"m-{fmt}") == reference
