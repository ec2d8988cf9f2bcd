"""Benchmark of the strata volume plugin service, as Docker drives it.

    python -m benchmarks.volume_plugin [--quick] [--shared] [--format json] [--out FILE]

Starts a private `strata serve` (temp state root, temp socket) and measures,
over the real protocol (aiohttp client, Docker's headers and bodies):

- Mount and Unmount latency (median, p99) per volume type: local, local with
  size= (an ext4 image loop-mounted on first Mount), tmpfs (a mount(2) on first
  Mount) and clone (a strata-unionfs FUSE mount);
- requests per second at 1, 16 and 64 concurrent clients, each client a
  separate connection doing Mount+Unmount pairs with its own IDs, on one shared
  volume and on one volume per client, and Get calls (the read path Docker
  hits most).

Every Mount/Unmount is a durable state change (temp file, fsync, rename, fsync
of the directory), so these figures include the disk's fsync latency.

With `--shared` it also starts a private single-node Ceph cluster
(benchmarks.ceph: one OSD on memstore, so the cluster's disk is memory and these
figures are the client side's: ceph-fuse, the MDS round trips, strata's records
in CephFS) and serves the shared plugin beside the local one: Mount/Unmount
latency of a `cephfs` volume (each Mount a ceph-fuse mount), requests per second
on it, and data throughput through a mounted CephFS volume beside a local one
(sequential write with fsync and read back, small files created and read),
interleaved repeats, medians and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plugin_api.client import PluginClient
from runtime.output import Progress, print_json, print_table
from volumes.state import remove_tree

from . import processes

STRATA = str(Path(sys.executable).with_name("strata"))
CONCURRENCY = (1, 16, 64)


@contextmanager
def plugin_service(cephfs: dict[str, Any] | None = None, name: str = "strata",
                   sock: Path | None = None) -> Iterator[tuple[str, str]]:
    """A `strata serve` on a private root and socket (unless one is given, such as
    /run/docker/plugins/NAME.sock for a dockerd to find; with cephfs settings, also its
    shared plugin); yields the local and the shared plugin's addresses, always cleans up."""
    top = Path(tempfile.mkdtemp(prefix="strata-bench-vol-", dir="/tmp"))
    sock, shared = sock or top / "p.sock", top / "s.sock"
    config = top / "volumes.json"
    config.write_text(json.dumps({"cephfs": cephfs} if cephfs else {}))
    log = open(top / "serve.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [STRATA, "--root", str(top / "state"), "serve", "--name", name, "--socket", str(sock),
         "--shared-socket", str(shared), "--spec-dir", str(top / "spec"), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(shared if cephfs else sock))
                    break
                except OSError:
                    pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"strata serve did not start: {(top / 'serve.log').read_text()}")
            time.sleep(0.05)
        yield f"unix://{sock}", f"unix://{shared}"
    finally:
        processes.stop(proc, 30)
        log.close()
        remove_tree(top)  # detaches any volume mount a failed run left


def summary(samples: list[float]) -> dict[str, float]:
    """Median and p99 in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"n": len(samples), "median_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3}


async def latency(address: str, vtype: str, rounds: int, progress: Progress) -> dict[str, Any]:
    """Sequential Mount/Unmount pairs on one volume: every Mount is a first one (provisions)."""
    opts = {
        "local": None,
        "local-size": {"size": "64m"},
        "tmpfs": {"type": "tmpfs", "size": "16m"},
        "clone": {"type": "clone", "from": "lat-src"},
        "cephfs": None,  # on the shared plugin
    }
    name = f"lat-{vtype}"
    mounts, unmounts = [], []
    async with PluginClient(address, timeout=120) as c:
        if vtype == "clone":
            await c.create("lat-src", None)
        await c.create(name, opts[vtype])
        for i in range(rounds):
            mid = f"{i:064x}"
            t0 = time.perf_counter()
            await c.mount(name, mid)
            t1 = time.perf_counter()
            await c.unmount(name, mid)
            t2 = time.perf_counter()
            mounts.append(t1 - t0)
            unmounts.append(t2 - t1)
            progress.advance()
        await c.remove(name)
        if vtype == "clone":
            await c.remove("lat-src")
    return {"type": vtype, "mount": summary(mounts), "unmount": summary(unmounts)}


async def throughput(address: str, workload: str, clients: int, seconds: float) -> dict[str, Any]:
    """Requests per second with `clients` connections hammering for `seconds`."""
    sessions = [PluginClient(address, timeout=120) for _ in range(clients)]
    for s in sessions:
        await s.__aenter__()
    try:
        await sessions[0].create("shared", None)
        for i, s in enumerate(sessions):
            await s.create(f"own{i}", None)

        def op(i: int, c: PluginClient) -> Callable[[int], Awaitable[int]]:
            async def mount_pair(n: int, vol: str) -> int:
                mid = f"{i:032x}{n:032x}"
                await c.mount(vol, mid)
                await c.unmount(vol, mid)
                return 2

            async def get(n: int) -> int:
                await c.get("shared")
                return 1

            table: dict[str, Callable[[int], Awaitable[int]]] = {
                "mount+unmount, shared volume": lambda n: mount_pair(n, "shared"),
                "mount+unmount, volume per client": lambda n: mount_pair(n, f"own{i}"),
                "get": get,
            }
            return table[workload.removeprefix("cephfs ")]

        deadline = time.perf_counter() + seconds
        latencies: list[float] = []

        async def worker(i: int, c: PluginClient) -> int:
            fn, done, n = op(i, c), 0, 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                k = await fn(n)
                latencies.append((time.perf_counter() - t0) / k)
                done += k
                n += 1
            return done

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(worker(i, c) for i, c in enumerate(sessions)))
        elapsed = time.perf_counter() - t0
        for i, s in enumerate(sessions):
            await s.remove(f"own{i}")
        await sessions[0].remove("shared")
    finally:
        for s in sessions:
            await s.__aexit__(None, None, None)
    return {"workload": workload, "clients": clients, "requests": sum(counts),
            "requests_per_s": sum(counts) / elapsed, **summary(latencies)}


def seq_write(path: Path, size: int) -> float:
    """Seconds to write size bytes in 1 MiB blocks and fsync."""
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path / "seq", "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def seq_read(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path / "seq", "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    took = time.perf_counter() - t0
    os.unlink(path / "seq")
    return took


def small_create(path: Path, count: int) -> float:
    """Seconds to create count files of 4 KiB in a fresh directory and fsync it."""
    d = path / "small"
    data = os.urandom(4096)
    t0 = time.perf_counter()
    d.mkdir()
    for i in range(count):
        with open(d / f"f{i}", "wb") as f:
            f.write(data)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def small_read(path: Path, count: int) -> float:
    d = path / "small"
    t0 = time.perf_counter()
    for i in range(count):
        with open(d / f"f{i}", "rb") as f:
            f.read()
    took = time.perf_counter() - t0
    remove_tree(d)
    return took


async def data_throughput(local: str, shared: str, size: int, files: int, repeats: int,
                          progress: Progress) -> list[dict[str, Any]]:
    """The same file workloads through a mounted local volume and a mounted CephFS volume,
    interleaved, `repeats` times each; medians and the CephFS/local ratio."""
    workloads: list[tuple[str, str, Callable[[Path], float]]] = [
        ("sequential write + fsync", f"{size >> 20} MiB", lambda p: seq_write(p, size)),
        ("sequential read (just written)", f"{size >> 20} MiB", seq_read),
        ("small files: create + write", f"{files} x 4 KiB", lambda p: small_create(p, files)),
        ("small files: read (just written)", f"{files} x 4 KiB", lambda p: small_read(p, files)),
    ]
    async with PluginClient(local, timeout=120) as lc, PluginClient(shared, timeout=120) as sc:
        await lc.create("io-local", None)
        await sc.create("io-ceph", None)
        paths = {"local": Path(await lc.mount("io-local", "bench")),
                 "cephfs": Path(await sc.mount("io-ceph", "bench"))}
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(repeats):
                for which, path in paths.items():
                    for label, _, fn in workloads:
                        times.setdefault((label, which), []).append(await asyncio.to_thread(fn, path))
                    progress.advance()
        finally:
            await lc.unmount("io-local", "bench")
            await sc.unmount("io-ceph", "bench")
            await lc.remove("io-local")
            await sc.remove("io-ceph")
    out = []
    for label, amount, _ in workloads:
        loc, cep = (statistics.median(times[(label, w)]) for w in ("local", "cephfs"))
        out.append({"workload": label, "amount": amount, "local_s": loc, "cephfs_s": cep, "ratio": cep / loc})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.volume_plugin",
        description="Mount/Unmount latency and requests per second of the strata volume plugin service.",
    )
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs (a smoke test)")
    ap.add_argument("--rounds", type=int, help="Mount/Unmount pairs per type for latency (default 300)")
    ap.add_argument("--seconds", type=float, help="duration of each throughput run (default 3)")
    ap.add_argument("--types", default="local,local-size,tmpfs,clone",
                    help="volume types to time (default %(default)s)")
    ap.add_argument("--shared", action="store_true",
                    help="also the shared (CephFS) backend, on a private single-node Ceph cluster")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.volume_plugin: run as root (tmpfs and FUSE mounts)")
    rounds = args.rounds or (30 if args.quick else 300)
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    types = [t for t in args.types.split(",") if t]
    workloads = ["mount+unmount, shared volume", "mount+unmount, volume per client", "get"]

    results: dict[str, Any] = {"latency": [], "throughput": [], "data": []}
    with contextlib.ExitStack() as stack:
        cephfs = None
        if args.shared:
            from .ceph import running_ceph

            cluster = stack.enter_context(running_ceph())
            cluster.make_dir("/strata")
            cephfs = cluster.strata_config("/strata")
            results["ceph_start_s"] = cluster.started_in
            types.append("cephfs")
        address, shared = stack.enter_context(plugin_service(cephfs))
        for vtype in types:
            # A FUSE daemon or a loop-mounted ext4 per round: fewer rounds.
            n = rounds if vtype in ("local", "tmpfs") else max(10, rounds // 10)
            with Progress(f"latency {vtype}", total=n) as prog:
                where = shared if vtype == "cephfs" else address
                results["latency"].append(asyncio.run(latency(where, vtype, n, prog)))
        runs = [(w, c, address) for w in workloads for c in CONCURRENCY]
        if args.shared:  # each first Mount is a ceph-fuse start: 16 clients at most
            runs += [(f"cephfs {w}", c, shared) for w in workloads for c in CONCURRENCY[:2]]
        with Progress("throughput", total=len(runs)) as prog:
            for w, clients, where in runs:
                results["throughput"].append(asyncio.run(throughput(where, w, clients, seconds)))
                prog.advance()
        if args.shared:
            size, files, repeats = ((64 << 20, 300, 2) if args.quick else (256 << 20, 2000, 3))
            with Progress("data throughput", total=2 * repeats) as prog:
                results["data"] = asyncio.run(data_throughput(address, shared, size, files, repeats, prog))

    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.format == "json":
        print_json(results)
        return 0
    print("Mount / Unmount latency (sequential, one client; every Mount provisions the volume)")
    print_table(
        ["TYPE", "N", "MOUNT MEDIAN ms", "MOUNT p99 ms", "UNMOUNT MEDIAN ms", "UNMOUNT p99 ms"],
        [[r["type"], r["mount"]["n"], f"{r['mount']['median_ms']:.2f}", f"{r['mount']['p99_ms']:.2f}",
          f"{r['unmount']['median_ms']:.2f}", f"{r['unmount']['p99_ms']:.2f}"] for r in results["latency"]],
    )
    print()
    print(f"Requests per second ({seconds:g} s per run)")
    print_table(
        ["WORKLOAD", "CLIENTS", "REQUESTS", "REQ/S", "MEDIAN ms", "p99 ms"],
        [[r["workload"], r["clients"], r["requests"], f"{r['requests_per_s']:.0f}", f"{r['median_ms']:.2f}",
          f"{r['p99_ms']:.2f}"] for r in results["throughput"]],
    )
    if results["data"]:
        print()
        print(f"Data through a mounted volume, CephFS beside local (medians; Ceph cluster up in "
              f"{results['ceph_start_s']:.1f} s)")
        print_table(
            ["WORKLOAD", "AMOUNT", "LOCAL s", "CEPHFS s", "CEPHFS / LOCAL"],
            [[r["workload"], r["amount"], f"{r['local_s']:.3f}", f"{r['cephfs_s']:.3f}", f"{r['ratio']:.2f}"]
             for r in results["data"]],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
