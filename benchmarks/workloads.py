"""The workloads: the rows of the design's performance table, mount time,
and the layer-count scaling rows. Each one times just its own operation on a
view and returns seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .dataset import BIG, RMDIR, SMALL, SMALL_SIZE, STALL, TREE, Dataset, Stack

COLD, WARM, FRESH = "cold", "warm", "fresh"
GROUPS = ("mount", "metadata", "read", "write")


@dataclass(frozen=True)
class Sample:
    """What a workload sees: the view's root, its mount time, and how long it may take."""

    root: Path
    mount_seconds: float | None
    timeout: float


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    group: str  # one of GROUPS, or "scaling"
    # COLD: caches dropped after a fresh mount; WARM: run once before (a mount row: mounted and
    # unmounted once before, so no row pays for what an earlier row's cache drop evicted);
    # FRESH: a fresh mount, nothing else.
    mode: str
    stack: Stack
    run: Callable[[Sample], float]
    writes: tuple[str, ...] | None = None  # lower paths it changes; None = read-only
    measures_mount: bool = False  # the row is the mount itself (nothing to measure on a plain directory)
    layers: int | None = None  # the scaling rows
    warm_up: Callable[[Sample], float] | None = None  # what WARM runs first, when cheaper than run itself
    readonly: bool = False  # the union is mounted without an upper (passthrough reads every file)


def _timed(cmd: list[str], s: Sample) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        cmd,
        timeout=s.timeout,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    elapsed = time.perf_counter() - start
    _check(cmd, done.returncode, done.stderr)
    return elapsed


def _check(cmd: list[str], status: int, stderr: str) -> None:
    if status != 0:
        lines = stderr.strip().splitlines()
        raise RuntimeError(f"{cmd[0]} exited with status {status}" + (f": {lines[-1]}" if lines else ""))


def _find(s: Sample) -> float:
    return _timed(["find", str(s.root / TREE)], s)


def _stat_all(paths: tuple[str, ...]) -> Callable[[Sample], float]:
    def run(s: Sample) -> float:
        full = [os.path.join(s.root, p) for p in paths]
        start = time.perf_counter()
        for p in full:
            os.lstat(p)
        return time.perf_counter() - start

    return run


def _dd(s: Sample) -> float:
    return _timed(["dd", f"if={s.root / BIG}", "of=/dev/null", "bs=1M"], s)


def _tar(name: str) -> Callable[[Sample], float]:
    def run(s: Sample) -> float:
        # Piped through cat: GNU tar skips reading file data when writing to /dev/null.
        start = time.perf_counter()
        cmd = ["tar", "-cf", "-", "-C", str(s.root), name]
        with subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as cat:
            done = subprocess.run(cmd, stdout=cat.stdin, stderr=subprocess.PIPE, text=True, timeout=s.timeout)
            assert cat.stdin is not None
            cat.stdin.close()
            cat.wait(s.timeout)
        elapsed = time.perf_counter() - start
        _check(cmd, done.returncode, done.stderr)
        return elapsed

    return run


# Another process's loop during a copy-up: stat + open + read of a small file, 1 ms
# apart, each timed (start on CLOCK_MONOTONIC, which all processes share), until
# its stdin closes; prints the (start, seconds) pairs.
_READER = """
import json, os, sys, threading, time
path, out, stop = sys.argv[1], [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
while not stop.is_set():
    t = time.monotonic()
    os.stat(path)
    with open(path, "rb") as f:
        f.read()
    out.append((t, time.monotonic() - t))
    time.sleep(0.001)
print(json.dumps(out))
"""


def _stall(stat: Callable[[list[float]], float]) -> Callable[[Sample], float]:
    """What another reader waits while a big lower file is copied up (appended to)."""

    def run(s: Sample) -> float:
        cmd = [sys.executable, "-c", _READER, str(s.root / SMALL / "f00000")]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as reader:
            assert reader.stdin is not None and reader.stdout is not None
            try:
                if reader.stdout.readline().strip() != "ready":
                    raise RuntimeError("the reader did not start")
                time.sleep(0.05)
                start = time.monotonic()
                with open(s.root / STALL, "ab") as f:
                    f.write(b"x")
                end = time.monotonic()
                time.sleep(0.05)  # a few reads after it, in case none overlapped a short one
            finally:
                reader.stdin.close()
            out = reader.stdout.read()
            reader.wait(s.timeout)
        after = [(t, w) for t, w in json.loads(out) if t + w >= start]
        if not after:
            raise RuntimeError("the reader stopped before the copy-up")
        # The reads that overlapped it; a copy-up shorter than one read: the read it met.
        waits = [w for t, w in after if t <= end] or [after[0][1]]
        return stat(waits)

    return run


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def _fio(reads: int, big_mib: int) -> Callable[[Sample], float]:
    def run(s: Sample) -> float:
        # fio's own latency sum leaves out its start-up, which would swamp small runs;
        # invalidate=0 keeps the page cache the warm-up filled.
        cmd = [
            "fio",
            "--name=randread",
            f"--filename={s.root / BIG}",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            f"--size={big_mib}M",
            f"--io_size={reads * 4}k",
            "--invalidate=0",
            "--readonly",
            "--output-format=json",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout, stdin=subprocess.DEVNULL)
        _check(cmd, out.returncode, out.stderr)
        read = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
        if read["total_ios"] != reads:
            raise RuntimeError(f"fio did {read['total_ios']} reads, not {reads}")
        return float(read["lat_ns"]["mean"]) * reads / 1e9

    return run


def _copy_up(s: Sample) -> float:
    start = time.perf_counter()
    with open(s.root / BIG, "ab") as f:
        f.write(b"x")
    return time.perf_counter() - start


def _create(count: int) -> Callable[[Sample], float]:
    data = os.urandom(4096)

    def run(s: Sample) -> float:
        d = s.root / "created"
        start = time.perf_counter()
        d.mkdir()
        for i in range(count):
            fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return time.perf_counter() - start

    return run


def _rm(s: Sample) -> float:
    return _timed(["rm", "-rf", str(s.root / RMDIR)], s)


def _mount_time(s: Sample) -> float:
    assert s.mount_seconds is not None
    return s.mount_seconds


def build(cfg: Config, ds: Dataset) -> list[Workload]:
    """Every row of a run, in the order it runs within a repetition."""
    m = ds.main
    mib = ds.tree_bytes / (1 << 20)
    stat = _stat_all(ds.tree_paths)
    rows = [
        Workload(
            "mount",
            f"mount ({cfg.tree_files} files, 2 layers)",
            "mount",
            WARM,
            m,
            _mount_time,
            measures_mount=True,
        ),
        Workload("find-cold", f"find, cold ({len(ds.tree_paths)} entries)", "metadata", COLD, m, _find),
        Workload("find-warm", f"find, warm ({len(ds.tree_paths)} entries)", "metadata", WARM, m, _find),
        Workload("stat-cold", f"stat all, cold ({len(ds.tree_paths)} entries)", "metadata", COLD, m, stat),
        Workload("stat-warm", f"stat all, warm ({len(ds.tree_paths)} entries)", "metadata", WARM, m, stat),
        Workload("dd-cold", f"dd {cfg.big_mib} MiB, cold", "read", COLD, m, _dd),
        Workload("dd-warm", f"dd {cfg.big_mib} MiB, warm", "read", WARM, m, _dd),
        Workload(
            "fio-warm",
            f"fio {cfg.fio_reads} x 4 KiB random reads, warm",
            "read",
            WARM,
            m,
            _fio(cfg.fio_reads, cfg.big_mib),
            warm_up=_dd,  # the same pages cached, without fio's start-up
        ),
        Workload("tar-warm", f"tar of the tree ({mib:.0f} MiB), warm", "read", WARM, m, _tar(TREE)),
        Workload("dd-cold-ro", f"dd {cfg.big_mib} MiB, cold, read-only mount", "read", COLD, m, _dd,
                 readonly=True),
        Workload("dd-warm-ro", f"dd {cfg.big_mib} MiB, warm, read-only mount", "read", WARM, m, _dd,
                 readonly=True),
        Workload("tar-warm-ro", f"tar of the tree ({mib:.0f} MiB), warm, read-only mount", "read", WARM, m,
                 _tar(TREE), readonly=True),
        Workload("tar-small-warm", f"tar of {cfg.small_files} files of {SMALL_SIZE} B, warm", "read", WARM, m,
                 _tar(SMALL)),
        Workload("tar-small-cold", f"tar of {cfg.small_files} files of {SMALL_SIZE} B, cold", "read", COLD, m,
                 _tar(SMALL)),
        Workload(
            "copy-up",
            f"copy-up: append 1 byte to a {cfg.big_mib} MiB lower file",
            "write",
            FRESH,
            m,
            _copy_up,
            writes=(BIG,),
        ),
        Workload(
            "stall-p99",
            f"another reader's p99 wait during a {cfg.stall_mib} MiB copy-up",
            "write",
            FRESH,
            m,
            _stall(_p99),
            writes=(STALL, SMALL),  # the plain baseline needs the file the reader reads
        ),
        Workload(
            "stall-max",
            f"another reader's longest wait during a {cfg.stall_mib} MiB copy-up",
            "write",
            FRESH,
            m,
            _stall(max),
            writes=(STALL, SMALL),  # the plain baseline needs the file the reader reads
        ),
        Workload(
            "create",
            f"create + write {cfg.create_files} x 4 KiB",
            "write",
            FRESH,
            m,
            _create(cfg.create_files),
            writes=(),
        ),
        Workload(
            "rm", f"rm -rf a lower dir of {cfg.rm_files} files", "write", FRESH, m, _rm, writes=(RMDIR,)
        ),
    ]
    scan = _stat_all(ds.scaling_paths)
    for n in cfg.layer_counts:
        st = ds.scaling[n]
        rows += [
            Workload(
                f"layers{n}-mount",
                f"mount, {n} layers",
                "scaling",
                WARM,
                st,
                _mount_time,
                measures_mount=True,
                layers=n,
            ),
            Workload(
                f"layers{n}-stat-cold", f"stat all, cold, {n} layers", "scaling", COLD, st, scan, layers=n
            ),
            Workload(
                f"layers{n}-stat-warm", f"stat all, warm, {n} layers", "scaling", WARM, st, scan, layers=n
            ),
        ]
    return rows
