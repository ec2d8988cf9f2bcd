"""A private Debian `docker-registry` (distribution 2.8) on 127.0.0.1 for pull/push tests:
filesystem storage in a temp dir, a free port, stopped and removed afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import processes

REGISTRY = "/usr/bin/docker-registry"


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_registry() -> Iterator[Registry]:
    if not shutil.which(REGISTRY):
        raise RuntimeError(f"{REGISTRY} missing: install Debian's docker-registry (make deps)")
    root = Path(tempfile.mkdtemp(prefix="strata-registry-"))
    port = _free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: strata-test\n"
    )
    log = root / "registry.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", root / "data", log)
    finally:
        processes.stop(proc, 10)
        shutil.rmtree(root, ignore_errors=True)
