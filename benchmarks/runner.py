"""A benchmark run: set-up, then repetitions that each run every workload on
every system in turn (rotating the order, so drift and noise hit all alike),
with progress on stderr. Returns every sample, errors included, never a
made-up number."""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common import kernel
from common.errors import StrataError

from . import daemon, dataset, mounts, workloads
from .config import Config
from .systems import System, set_up
from .workloads import COLD, WARM, Sample, Workload

Log = Callable[[str], None]


def run(cfg: Config, systems: Sequence[System], workdir: Path, log: Log) -> dict[str, Any]:
    """Measure every workload on every system; the result is JSON-ready."""
    if os.geteuid() != 0:
        raise StrataError("benchmarks need root: they mount filesystems and drop the page cache")
    started = datetime.datetime.now(datetime.UTC)
    unavailable = set_up(systems, log)
    for key, why in unavailable.items():
        log(f"{key}: {why}")
    workdir.mkdir(parents=True, exist_ok=True)
    # Short on purpose: 128 lower layers must fit the kernel's 4 KiB mount option limit.
    root = Path(tempfile.mkdtemp(prefix="sb", dir=workdir))
    try:
        ds = dataset.build(root, cfg, log)
        rows = workloads.build(cfg, ds)
        samples = _repeat(cfg, rows, systems, unavailable, root / "x", log)
    finally:
        _remove(root, log)
    return {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": asdict(cfg),
            "tree_entries": len(ds.tree_paths),
            "tree_mib": round(ds.tree_bytes / (1 << 20), 1),
            "machine": {
                "kernel": os.uname().release,
                "cpus": os.cpu_count(),
                "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
            },
        },
        "systems": [
            {"key": s.key, "title": s.title, "version": s.version(), "unavailable": unavailable.get(s.key)}
            for s in systems
        ],
        "rows": [
            {"key": w.key, "title": w.title, "group": w.group, "mode": w.mode, "layers": w.layers}
            for w in rows
        ],
        "samples": samples,
    }


def applies(w: Workload, s: System) -> bool:
    return s.union or not w.measures_mount


def _repeat(
    cfg: Config,
    rows: list[Workload],
    systems: Sequence[System],
    unavailable: dict[str, str],
    scratch: Path,
    log: Log,
) -> list[dict[str, Any]]:
    total = cfg.reps * sum(applies(w, s) for w in rows for s in systems)
    samples: list[dict[str, Any]] = []
    failed: dict[tuple[str, str], str] = {}  # (workload, system) -> error: skip its remaining reps
    no_mount: dict[tuple[str, int], str] = {}  # (system, id(stack)) -> why it would not mount
    done, start = 0, time.monotonic()
    for rep in range(cfg.reps):
        order = [*systems[rep % len(systems) :], *systems[: rep % len(systems)]]
        for w in rows:
            for s in order:
                if not applies(w, s):
                    continue
                done += 1
                rec: dict[str, Any] = {
                    "workload": w.key,
                    "system": s.key,
                    "rep": rep,
                    "seconds": None,
                    "error": None,
                }
                rec["error"] = (
                    failed.get((w.key, s.key)) or unavailable.get(s.key) or no_mount.get((s.key, id(w.stack)))
                )
                if rec["error"] is None:
                    try:
                        rec.update(_sample(w, s, scratch / str(done), cfg.timeout))
                    except mounts.MountError as e:
                        rec["error"] = no_mount[(s.key, id(w.stack))] = f"mount failed: {e}"
                    except Exception as e:  # a failing workload is a result to report, not a reason to stop
                        rec["error"] = f"{type(e).__name__}: {e}"
                    if rec["error"]:
                        failed[(w.key, s.key)] = rec["error"]
                samples.append(rec)
                elapsed = time.monotonic() - start
                eta = elapsed / done * (total - done)
                shown = f"{rec['seconds']:.4f} s" if rec["seconds"] is not None else f"error: {rec['error']}"
                log(
                    f"[{done:>4}/{total} {elapsed:4.0f}s eta {eta:4.0f}s] rep {rep + 1}/{cfg.reps}  "
                    f"{w.title[:44]:<44} {s.title:<16} {shown}"
                )
    return samples


def _sample(w: Workload, s: System, scratch: Path, timeout: float) -> dict[str, Any]:
    if w.measures_mount and w.mode == WARM:
        with mounts.view(s, w.stack, scratch, w.writes, timeout, w.readonly):
            pass
    with mounts.view(s, w.stack, scratch, w.writes, timeout, w.readonly) as v:
        smp = Sample(v.path, v.mount_seconds, timeout)
        if w.mode == COLD:
            drop_caches()
        elif w.mode == WARM:
            _guarded(w.warm_up or w.run, smp, v)
        # Flush what earlier samples left dirty, so no sample pays for another's writeback.
        os.sync()
        cpu0 = 0.0 if w.measures_mount or v.pid is None else daemon.cpu_seconds(v.pid)
        seconds = _guarded(w.run, smp, v)
        out: dict[str, Any] = {"seconds": seconds, "mount_seconds": v.mount_seconds}
        if v.pid is not None:
            out["daemon_cpu_seconds"] = daemon.cpu_seconds(v.pid) - cpu0
            out["daemon_peak_rss_kib"] = daemon.peak_rss_kib(v.pid)
        return out


def _guarded(run: Callable[[Sample], float], smp: Sample, v: mounts.View) -> float:
    """Run the workload; a FUSE daemon that hangs past the timeout gets its connection aborted."""
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        if v.conn is not None:
            mounts.abort(v.conn)

    timer = threading.Timer(smp.timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        seconds = run(smp)
    except Exception:
        if fired.is_set():
            raise TimeoutError(f"no answer within {smp.timeout:.0f} s (FUSE connection aborted)") from None
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise TimeoutError(f"took longer than {smp.timeout:.0f} s")
    return seconds


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _remove(root: Path, log: Log) -> None:
    """Delete the run's data, unless a mount is still live under it (never delete through one)."""
    inside = [t for _, t, _, _ in kernel.mounts() if t.startswith(f"{root}/")]
    if inside:
        log(f"left {root} in place: still mounted: {', '.join(inside)}")
        return
    shutil.rmtree(root, ignore_errors=True)
