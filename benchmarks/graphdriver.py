"""dockerd on strata (the GraphDriver plugin of `strata serve`, layers as strata-unionfs
mounts) beside dockerd on its own overlay2 (the kernel's overlayfs): `docker load` of the
same archive and `docker run --rm IMAGE true`, same machine, interleaved.

    python -m benchmarks.graphdriver [--quick] [--rounds N] [--runs N] [--format json]

Each round starts a fresh private dockerd per storage driver (benchmarks.dockerd, under
the machine-wide lock; the order alternates between rounds), loads the archive once
(timed) and times `run --rm` after one warm-up run. The archive is a busybox image plus a
layer of 2,000 small files and one 32 MiB file, made once by an overlay2 dockerd and saved.
Figures are medians over rounds (load) and over all runs (run); the ratio is strata's
median over overlay2's (lower is better)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.output import print_json, print_table

from .dockerd import Dockerd, busybox_rootfs_tar, running_dockerd
from .volume_plugin import plugin_service

PLUGIN = "stratabench"
IMAGE = "strata-bench:payload"
DRIVERS = ("overlay2", "strata")


def _timed(d: Dockerd, *args: str) -> float:
    start = time.perf_counter()
    d.docker(*args, timeout=600)
    return time.perf_counter() - start


def make_archive(tmp: Path) -> Path:
    """The image every round loads, saved by an overlay2 dockerd."""
    base = busybox_rootfs_tar(tmp / "busybox.tar")
    archive = tmp / "payload.tar"
    with running_dockerd() as d:
        d.docker("import", str(base), "strata-bench:base")
        d.docker("run", "--name", "payload", "strata-bench:base", "sh", "-c",
                 "mkdir -p /payload && cd /payload && i=0; while [ $i -lt 2000 ]; do "
                 "echo file $i > f$i; i=$((i+1)); done; head -c 33554432 /dev/urandom > /payload/big",
                 timeout=600)
        d.docker("commit", "payload", IMAGE)
        d.docker("save", "-o", str(archive), IMAGE, timeout=600)
    return archive


def one_round(driver: str, archive: Path, runs: int) -> dict[str, Any]:
    """A fresh dockerd on driver: load once, then `run --rm IMAGE true` runs+1 times."""
    if driver == "strata":
        with plugin_service(name=PLUGIN, sock=Path(f"/run/docker/plugins/{PLUGIN}.sock")), \
                running_dockerd(["--experimental", "--storage-driver", PLUGIN]) as d:
            return _measure(d, archive, runs)
    with running_dockerd(["--storage-driver", "overlay2"]) as d:
        return _measure(d, archive, runs)


def _measure(d: Dockerd, archive: Path, runs: int) -> dict[str, Any]:
    load = _timed(d, "load", "-i", str(archive))
    times = [_timed(d, "run", "--rm", "--network", "none", IMAGE, "true") for _ in range(runs + 1)]
    return {"load_s": load, "run_s": times[1:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.graphdriver",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 runs (a smoke test)")
    ap.add_argument("--rounds", type=int, help="dockerd starts per driver (default 5)")
    ap.add_argument("--runs", type=int, help="timed `run --rm` per round (default 10)")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.graphdriver: run as root (dockerd, FUSE mounts)")
    rounds = args.rounds or (2 if args.quick else 5)
    runs = args.runs or (3 if args.quick else 10)
    samples: dict[str, dict[str, list[float]]] = {d: {"load_s": [], "run_s": []} for d in DRIVERS}
    with tempfile.TemporaryDirectory(prefix="strata-bench-graph-", dir="/var/tmp") as t:
        print("making the image archive...", file=sys.stderr, flush=True)
        archive = make_archive(Path(t))
        archive_bytes = archive.stat().st_size
        for r in range(rounds):
            order = DRIVERS if r % 2 == 0 else DRIVERS[::-1]
            for driver in order:
                print(f"round {r + 1}/{rounds}: {driver}", file=sys.stderr, flush=True)
                got = one_round(driver, archive, runs)
                samples[driver]["load_s"].append(got["load_s"])
                samples[driver]["run_s"].extend(got["run_s"])
    medians = {d: {k: statistics.median(v) for k, v in s.items()} for d, s in samples.items()}
    result = {"rounds": rounds, "runs_per_round": runs, "archive_bytes": archive_bytes, "medians": medians,
              "ratio_strata_to_overlay2": {k: medians["strata"][k] / medians["overlay2"][k] for k in
                                           ("load_s", "run_s")},
              "samples": samples}
    if args.format == "json":
        print_json(result)
        return 0
    print(f"dockerd 20.10, {rounds} rounds (a fresh dockerd each), {runs} runs per round; medians")
    print_table(
        ["WORKLOAD", "OVERLAY2", "STRATA", "STRATA / OVERLAY2"],
        [[name, f"{medians['overlay2'][k]:.3f} s", f"{medians['strata'][k]:.3f} s",
          f"{medians['strata'][k] / medians['overlay2'][k]:.2f}"]
         for name, k in (("docker load (busybox + 2,000 files + 32 MiB)", "load_s"),
                         ("docker run --rm IMAGE true", "run_s"))],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
