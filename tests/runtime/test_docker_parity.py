"""Issue 11's security parity test: the same probes (tests/runtime/probes.py) in a real
`docker run` (Debian's dockerd with its own data root, an image imported from the same
busybox tar) and in `strata run`. strata must block at least everything docker blocks;
the table is printed whatever the outcome."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from runtime.output import print_table
from tests.runtime import probes
from tests.runtime.conftest import Loop, Strata
from tests.support.dockerd import running_dockerd

DOCKER_IMAGE = "strata-probe:test"
pytestmark = pytest.mark.timeout(900)


def _wait_until_no_dockerd(limit: float = 600) -> None:
    """Only one dockerd may run on the machine: someone else's must go first."""
    deadline = time.monotonic() + limit
    while subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            pytest.fail(f"another dockerd is still running after {limit:.0f}s")
        time.sleep(2)


def test_strata_blocks_everything_docker_blocks(strata: Strata, probe_image: str, probe_tar: Path,
                                                loop_device: Loop,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ours = probes.run(loop_device, lambda script: strata("run", "--rm", "--network", "none", probe_image,
                                                         "sh", "-c", script).stdout)
    _wait_until_no_dockerd()
    with running_dockerd() as d:
        d.docker("import", str(probe_tar), DOCKER_IMAGE)
        theirs = probes.run(loop_device, lambda script: d.docker("run", "--rm", "--network", "none",
                                                                 DOCKER_IMAGE, "sh", "-c", script).stdout)

    def word(allowed: bool) -> str:
        return "allowed" if allowed else "blocked"

    with capsys.disabled():
        print("\nsecurity parity (issue 11): what a default container could do")
        print_table(["PROBE", "DOCKER", "STRATA"], [[n, word(theirs[n]), word(ours[n])] for n in ours])
    assert theirs["mknod a block device"]  # the probes did run there ("b *:* m")
    worse = [n for n in ours if ours[n] and not theirs[n]]
    assert not worse, f"strata allows what docker blocks: {worse}"
