"""A run's results on disk: results.json (every sample and the summary),
results.md (the tables), and the PNG charts beside them. Writes each file
under a temporary name and renames it into place."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import charts
from .stats import REFERENCES, summarize


def write(result: dict[str, Any], out: Path) -> list[Path]:
    """Write every output into out (created); return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    cells = summarize(result)
    full = {**result, "cells": cells}
    paths = [
        _atomic(out / "results.json", json.dumps(full, indent=2, sort_keys=True) + "\n"),
        _atomic(out / "results.md", markdown(result, cells)),
    ]
    return paths + charts.draw(result, cells, out)


def _atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def fmt_seconds(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if v >= 0.001 else f"{v:.2e}"


def markdown(result: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    meta, cfg = result["meta"], result["meta"]["config"]
    systems = result["systems"]
    at = {(c["workload"], c["system"]): c for c in cells}
    main_rows = [r for r in result["rows"] if r["group"] != "scaling"]
    scale_rows = [r for r in result["rows"] if r["group"] == "scaling"]
    m = meta["machine"]
    lines = [f"# strata benchmarks: {cfg['name']} set, {meta['started']}", ""]
    if cfg["note"]:
        lines += [f"**{cfg['note'][0].upper()}{cfg['note'][1:]}.**", ""]
    lines += [
        f"Tree of {cfg['tree_files']} files ({meta['tree_entries']} entries, {meta['tree_mib']} MiB) "
        f"in 2 lower layers, a {cfg['big_mib']} MiB file; {cfg['reps']} repetitions, each running every "
        "system in turn. Cold = caches dropped after a fresh mount; warm = after one unmeasured run; "
        "write rows on a fresh mount. "
        f"Machine: Linux {m['kernel']}, {m['cpus']} CPUs, {m['mem_gib']} GiB RAM.",
        "",
        "Systems: "
        + "; ".join(f"{s['title']}" + (f" ({s['version']})" if s["version"] else "") for s in systems),
        "",
        "## Time in seconds: median [min, max], lower is better",
        "",
    ]

    def timing(c: dict[str, Any]) -> str:
        return f"{fmt_seconds(c['median'])} [{fmt_seconds(c['min'])}, {fmt_seconds(c['max'])}]"

    lines += _table(main_rows, systems, at, timing)
    for ref in REFERENCES:
        title = next((s["title"] for s in systems if s["key"] == ref), ref)
        lines += ["", f"## Ratio to {title} (median / median; below 1 is faster)", ""]
        lines += _table(main_rows, [s for s in systems if s["key"] != ref], at, _ratio_to(ref))
    daemons = [
        s for s in systems if any(c.get("daemon_peak_rss_mib") for c in cells if c["system"] == s["key"])
    ]
    if daemons:
        lines += ["", "## FUSE daemon: CPU seconds during the measured run / peak RSS in MiB", ""]
        lines += _table(
            main_rows + scale_rows,
            daemons,
            at,
            lambda c: f"{c['daemon_cpu_seconds']:.2f} s / {c['daemon_peak_rss_mib']:.0f} MiB"
            if c.get("daemon_peak_rss_mib") is not None
            else "?",
        )
    if scale_rows:
        lines += [
            "",
            f"## Lower-layer scaling: {cfg['scaling_files']} files spread over N layers, median seconds",
            "",
        ]
        lines += _table(scale_rows, systems, at, lambda c: fmt_seconds(c["median"]))
    errors = sorted({(c["system"], c["error"]) for c in cells if c["error"]})
    if errors:
        lines += ["", "## Errors", ""]
        for sys_key, err in errors:
            rows = [c["workload"] for c in cells if c["system"] == sys_key and c["error"] == err]
            lines.append(f"- {sys_key} ({', '.join(rows)}): {err}")
    return "\n".join(lines) + "\n"


def _ratio_to(ref: str) -> Callable[[dict[str, Any]], str]:
    return lambda c: _ratio(c[f"ratio_{ref}"])


def _ratio(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _table(
    rows: list[dict[str, Any]],
    systems: list[dict[str, Any]],
    at: dict[tuple[str, str], dict[str, Any]],
    show: Callable[[dict[str, Any]], str],
) -> list[str]:
    out = [
        "| workload | " + " | ".join(s["title"] for s in systems) + " |",
        "|---" * (len(systems) + 1) + "|",
    ]
    for r in rows:
        cells = []
        for s in systems:
            c = at.get((r["key"], s["key"]))
            cells.append("n/a" if c is None else "error" if c["error"] else show(c))
        out.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    return out
