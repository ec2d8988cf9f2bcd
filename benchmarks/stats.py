"""From samples to the figures a table shows: median and spread per
(workload, system) cell, and ratios to kernel overlayfs and to fuse-overlayfs."""

from __future__ import annotations

import statistics
from typing import Any

REFERENCES = ("overlayfs", "fuse-overlayfs")  # ratio columns: the kernel limit and the main peer


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per (workload, system) that was run; a cell with any error has no figures."""
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for smp in result["samples"]:
        by_cell.setdefault((smp["workload"], smp["system"]), []).append(smp)
    cells = []
    for row in result["rows"]:
        for sys in result["systems"]:
            samples = by_cell.get((row["key"], sys["key"]))
            if samples is None:
                continue
            cell: dict[str, Any] = {"workload": row["key"], "system": sys["key"]}
            cell["error"] = next((s["error"] for s in samples if s["error"]), None)
            if cell["error"] is None:
                cell.update(_figures(samples))
            cells.append(cell)
    medians = {(c["workload"], c["system"]): c.get("median") for c in cells}
    for c in cells:
        for ref in REFERENCES:
            base = medians.get((c["workload"], ref))
            c[f"ratio_{ref}"] = c["median"] / base if c.get("median") is not None and base else None
    return cells


def _figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    values = [s["seconds"] for s in samples]
    med = statistics.median(values)
    out: dict[str, Any] = {
        "n": len(values),
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": (max(values) - min(values)) / med * 100 if med else None,
    }
    for key in ("mount_seconds", "daemon_cpu_seconds"):
        vals = [s[key] for s in samples if s.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    rss = [s["daemon_peak_rss_kib"] for s in samples if s.get("daemon_peak_rss_kib") is not None]
    out["daemon_peak_rss_mib"] = max(rss) / 1024 if rss else None
    return out
