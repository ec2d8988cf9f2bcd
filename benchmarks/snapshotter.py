"""containerd on strata (`strata snapshotter`, a proxy plugin; unions mounted by containerd
through mount.fuse3, and with `--premount` by strata itself) against containerd's own
overlayfs snapshotter (kernel overlayfs), the same private containerd 1.6.20 and images:

- unpack: `ctr images import --snapshotter S` of a busybox image (docker-save archive as
  `strata save` writes it), the image and its snapshots removed (`images rm --sync`)
  before each repetition, so every import unpacks every layer;
- run: `ctr run --rm --snapshotter S IMAGE ID true`, image unpacked once beforehand;
- per-layer mount cost: the same `ctr run --rm ... true` on images of 2, 16 and 64 layers.

Repetitions are interleaved (strata, strata-premount, overlayfs, strata, ...) so the
machine's drift hits all alike; medians, and ratios to overlayfs (below 1: strata faster).

    python -m benchmarks.snapshotter [--quick] [--reps N] [--layers 2,16,64] [--format json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.output import print_json, print_table

from .containerd import Containerd, image_archive, running_containerd, running_snapshotter

PREMOUNT = "strata-premount"
SNAPSHOTTERS = ("strata", PREMOUNT, "overlayfs")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ref(tag: str) -> str:
    return f"docker.io/library/{tag}"


Log = Callable[[str], None]
Samples = dict[str, list[float]]


def bench_unpack(c: Containerd, archive: Path, tag: str, reps: int, log: Log) -> Samples:
    out: dict[str, list[float]] = {s: [] for s in SNAPSHOTTERS}
    for rep in range(reps + 1):  # the first round warms the page cache and is not counted
        for s in SNAPSHOTTERS:
            t = _timed(lambda s=s: c.ctr("images", "import", "--snapshotter", s, str(archive)))  # type: ignore[misc]
            c.ctr("images", "rm", "--sync", _ref(tag))
            if rep:
                out[s].append(t)
        log(f"  unpack {tag}: round {rep}/{reps}")
    return out


def bench_run(c: Containerd, archive: Path, tag: str, reps: int, log: Log) -> Samples:
    for s in SNAPSHOTTERS:  # one image record, unpacked for each snapshotter
        c.ctr("images", "import", "--snapshotter", s, str(archive))
    out: dict[str, list[float]] = {s: [] for s in SNAPSHOTTERS}
    try:
        for rep in range(reps + 1):
            for s in SNAPSHOTTERS:
                cid = f"bench-{s}-{rep}"
                t = _timed(lambda s=s, cid=cid: c.run(_ref(tag), cid, "true", snapshotter=s))  # type: ignore[misc]
                if rep:
                    out[s].append(t)
            log(f"  run {tag}: round {rep}/{reps}")
    finally:
        c.ctr("images", "rm", "--sync", _ref(tag), check=False)
    return out


def _row(workload: str, samples: Samples) -> dict[str, Any]:
    med = {s: statistics.median(v) for s, v in samples.items()}
    return {"workload": workload, "reps": len(samples["strata"]), "median_s": med, "samples_s": samples,
            "ratio_to_overlayfs": {s: med[s] / med["overlayfs"] for s in SNAPSHOTTERS[:-1]}}


def run(reps: int, layer_counts: Sequence[int], log: Log) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="strata-bench-snap-", dir="/var/tmp") as t:
        tmp = Path(t)
        log("building images...")
        archives = {n: image_archive(tmp / f"bb{n}.tar", f"bench{n}:1", layers=n) for n in {3, *layer_counts}}
        with running_snapshotter() as snap, running_snapshotter(premount=True) as pre, \
                running_containerd(snap.address, more={PREMOUNT: pre.address}) as c:
            rows.append(_row("unpack: ctr images import (3 layers)",
                             bench_unpack(c, archives[3], "bench3:1", reps, log)))
            rows.append(_row("ctr run --rm IMAGE true (3 layers)",
                             bench_run(c, archives[3], "bench3:1", reps, log)))
            for n in layer_counts:
                rows.append(_row(f"ctr run --rm IMAGE true ({n} layers)",
                                 bench_run(c, archives[n], f"bench{n}:1", reps, log)))
            for n in layer_counts:
                rows.append(_row(f"unpack: ctr images import ({n} layers)",
                                 bench_unpack(c, archives[n], f"bench{n}:1", max(1, reps // 2), log)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.snapshotter",
                                 description="containerd on strata vs containerd's overlayfs snapshotter: "
                                 "unpack time, ctr run latency, cost per layer.")
    ap.add_argument("--quick", action="store_true",
                    help="3 repetitions and 2, 16 layers (default 7; 2, 16, 64)")
    ap.add_argument("--reps", type=int, help="repetitions per workload and snapshotter")
    ap.add_argument("--layers", help="layer counts for the per-layer rows (comma-separated)")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.snapshotter: run as root (containerd, mounts)")
    reps = args.reps or (3 if args.quick else 7)
    layers = [int(x) for x in (args.layers or ("2,16" if args.quick else "2,16,64")).split(",") if x]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows = run(reps, layers, log)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.format == "json":
        print_json(rows)
        return 0
    print("containerd 1.6.20: strata (proxy snapshotter, strata-unionfs; mounted by containerd, or by strata "
          "with --premount) vs overlayfs (kernel), "
          "medians, interleaved")
    print_table(["WORKLOAD", "REPS", "STRATA s", "PREMOUNT s", "OVERLAYFS s", "STRATA/OVL", "PREMOUNT/OVL"],
                [[r["workload"], r["reps"], *(f"{r['median_s'][s]:.3f}" for s in SNAPSHOTTERS),
                  *(f"{r['ratio_to_overlayfs'][s]:.2f}" for s in SNAPSHOTTERS[:-1])] for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
