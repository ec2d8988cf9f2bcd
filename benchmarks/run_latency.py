"""How long `run --rm IMAGE true` takes: strata (rootfs on strata-unionfs, and on the
kernel's overlayfs for comparison) beside docker (overlay2) and podman (kernel
overlay, and strata-unionfs as its mount_program), same busybox image, measured in
one run on this machine. Every engine runs with networking off, so the figures
compare starting a container, not setting up a network.

    python -m benchmarks.run_latency [-n RUNS] [--format json]

docker: a private dockerd (benchmarks.dockerd, holding the machine-wide lock);
podman: private storage and config in a temp dir. Everything is removed afterwards."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from unionfs import client

from .dockerd import busybox_rootfs_tar, running_dockerd

BIN = Path(sys.executable).parent
STRATA = str(BIN / "strata")


def measure(argv: list[str], runs: int, env: dict[str, str] | None = None) -> list[float]:
    """Wall-clock seconds of each run, after one warm-up run (page cache, first-use setup)."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        elapsed = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        if i:
            times.append(elapsed)
    return times


def bench_strata(tmp: Path, tar: Path, runs: int) -> dict[str, list[float]]:
    root = tmp / "strata"
    cli = [STRATA, "--root", str(root)]
    subprocess.run([*cli, "import", str(tar), "bench:1"], check=True, capture_output=True)
    try:
        out = {}
        for driver in ("strata-unionfs", "overlay"):
            argv = [*cli, "run", "--rm", "--network", "none", "--storage-driver", driver, "bench:1", "true"]
            out[f"strata run --rm ({driver})"] = measure(argv, runs)
        return out
    finally:
        subprocess.run([*cli, "system", "prune"], capture_output=True)


def bench_docker(tar: Path, runs: int) -> dict[str, list[float]]:
    with running_dockerd() as d:
        d.docker("import", str(tar), "bench:1")
        argv = [d.docker_bin, "run", "--rm", "--pull=never", "--network", "none", "bench:1", "true"]
        return {"docker run --rm (overlay2)": measure(argv, runs, env=d.env)}


def _podman_env(root: Path, mount_program: str | None) -> dict[str, str]:
    root.mkdir()
    storage = root / "storage.conf"
    extra = f'[storage.options.overlay]\nmount_program = "{mount_program}"\n' if mount_program else ""
    storage.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\n'
                       f'runroot = "{root}/run"\n{extra}')
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = root / "containers.conf"
    conf.write_text('[containers]\nnetns = "none"\n'
                    f'default_ulimits = ["nofile={hard}:{hard}", "nproc=4096:4096"]\n'
                    '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    f'events_logfile_path = "{root}/events.log"\n')
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage), "CONTAINERS_CONF": str(conf)}


def bench_podman(tmp: Path, tar: Path, runs: int) -> dict[str, list[float]]:
    podman = shutil.which("podman")
    if podman is None:
        raise SystemExit("podman missing: make deps installs Debian's podman")
    out = {}
    for label, program in (("overlay", None), ("strata-unionfs mount_program", client.program())):
        root = tmp / f"podman-{'fuse' if program else 'kernel'}"
        env = _podman_env(root, program)
        try:
            subprocess.run([podman, "import", "--quiet", str(tar), "localhost/bench:1"], env=env, check=True,
                           capture_output=True)
            argv = [podman, "run", "--rm", "--network", "none", "localhost/bench:1", "true"]
            out[f"podman run --rm ({label})"] = measure(argv, runs, env=env)
        finally:
            subprocess.run([podman, "rm", "--all", "--force", "--time", "0"], env=env, capture_output=True)
            subprocess.run([podman, "rmi", "--all", "--force"], env=env, capture_output=True)
            subprocess.run([podman, "system", "reset", "--force"], env=env, capture_output=True)
            with open("/proc/self/mounts") as f:
                targets = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(root))]
            for t in sorted(targets, reverse=True):
                subprocess.run(["umount", "-l", t], capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=7, help="measured runs per engine (default 7)")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--only", choices=["strata", "docker", "podman"], action="append",
                        help="measure only these engines (repeatable)")
    args = parser.parse_args(argv)
    engines = args.only or ["strata", "docker", "podman"]
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="strata-run-latency-") as t:
        tmp = Path(t)
        tar = busybox_rootfs_tar(tmp / "busybox.tar")
        steps: dict[str, Callable[[], dict[str, list[float]]]] = {
            "strata": lambda: bench_strata(tmp, tar, args.runs),
            "docker": lambda: bench_docker(tar, args.runs),
            "podman": lambda: bench_podman(tmp, tar, args.runs),
        }
        for engine in engines:
            print(f"measuring {engine}...", file=sys.stderr, flush=True)
            results.update(steps[engine]())
    if args.format == "json":
        print(json.dumps({k: {"median_s": statistics.median(v), "runs_s": v} for k, v in results.items()},
                         indent=2))
        return 0
    width = max(len(k) for k in results)
    print(f"{'command (image: busybox, --network none)':<{width}}  median    min       max     runs")
    for k, v in results.items():
        print(f"{k:<{width}}  {statistics.median(v):6.3f} s  {min(v):6.3f} s  {max(v):6.3f} s  {len(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
