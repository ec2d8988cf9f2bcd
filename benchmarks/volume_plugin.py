"""Benchmark of the strata volume plugin service, as Docker drives it.

    python -m benchmarks.volume_plugin [--quick] [--format json] [--out FILE]

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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

STRATA = str(Path(sys.executable).with_name("strata"))
CONCURRENCY = (1, 16, 64)


@contextmanager
def plugin_service(name: str = "strata", sock: Path | None = None) -> Iterator[str]:
    """A `strata serve` on a private root (and socket, unless one is given, such as
    /run/docker/plugins/NAME.sock for a dockerd to find); yields its address, always cleans up."""
    top = Path(tempfile.mkdtemp(prefix="strata-bench-vol-", dir="/tmp"))
    sock = sock or top / "p.sock"
    log = open(top / "serve.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [STRATA, "--root", str(top / "state"), "serve", "--name", name, "--socket", str(sock),
         "--spec-dir", str(top / "spec"), "--config", str(top / "none.json")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    break
                except OSError:
                    pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"strata serve did not start: {(top / 'serve.log').read_text()}")
            time.sleep(0.05)
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
            return table[workload]

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
    ap.add_argument("--format", choices=["table", "json"], default="table")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.volume_plugin: run as root (tmpfs and FUSE mounts)")
    rounds = args.rounds or (30 if args.quick else 300)
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    types = [t for t in args.types.split(",") if t]
    workloads = ["mount+unmount, shared volume", "mount+unmount, volume per client", "get"]

    results: dict[str, Any] = {"latency": [], "throughput": []}
    with plugin_service() as address:
        for vtype in types:
            # A FUSE daemon or a loop-mounted ext4 per round: fewer rounds.
            n = rounds if vtype in ("local", "tmpfs") else max(10, rounds // 10)
            with Progress(f"latency {vtype}", total=n) as prog:
                results["latency"].append(asyncio.run(latency(address, vtype, n, prog)))
        with Progress("throughput", total=len(workloads) * len(CONCURRENCY)) as prog:
            for w in workloads:
                for clients in CONCURRENCY:
                    results["throughput"].append(asyncio.run(throughput(address, w, clients, seconds)))
                    prog.advance()

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
