"""PNG charts of a run: one bar chart per workload group (each system's median
relative to kernel overlayfs, whiskers for min-max) and one line chart of
lower-layer scaling."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from .workloads import GROUPS

BASE = "overlayfs"
COLORS = {
    "strata-unionfs": "#d62728",
    "overlayfs": "#1f77b4",
    "fuse-overlayfs": "#2ca02c",
    "unionfs-fuse": "#ff7f0e",
    "plain": "#7f7f7f",
}


def draw(result: dict[str, Any], cells: list[dict[str, Any]], out: Path) -> list[Path]:
    at = {(c["workload"], c["system"]): c for c in cells}
    written = []
    for group in GROUPS:
        rows = [r for r in result["rows"] if r["group"] == group]
        if rows:
            written.append(_bars(result, group, rows, at, out / f"{group}.png"))
    if any(r["group"] == "scaling" for r in result["rows"]):
        written.append(_scaling(result, at, out / "scaling.png"))
    return written


def _bars(
    result: dict[str, Any], group: str, rows: list[dict[str, Any]], at: dict[tuple[str, str], Any], path: Path
) -> Path:
    """Relative to kernel overlayfs where it has a figure for every row, else plain seconds."""
    systems = [
        s for s in result["systems"] if any(at.get((r["key"], s["key"]), {}).get("median") for r in rows)
    ]
    base = {r["key"]: at.get((r["key"], BASE), {}).get("median") for r in rows}
    relative = all(base.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(rows) + 2), 4.8))
    width = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            c = at.get((r["key"], s["key"]))
            if not c or c.get("median") is None:
                continue
            scale = base[r["key"]] if relative else 1.0
            xs.append(j + (i - (len(systems) - 1) / 2) * width)
            ys.append(c["median"] / scale)
            lo.append((c["median"] - c["min"]) / scale)
            hi.append((c["max"] - c["median"]) / scale)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=s["title"], color=COLORS.get(s["key"]))
    labels = [_wrap(r["title"]) + (f"\n(overlayfs {base[r['key']]:.3g} s)" if relative else "") for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    _log_y(ax)
    if relative:
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel("time relative to kernel overlayfs (log)")
    else:
        ax.set_ylabel("seconds (log)")
    cfg = result["meta"]["config"]
    ax.set_title(f"{group}: median of {cfg['reps']} runs, whiskers min-max ({cfg['name']} set)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _scaling(result: dict[str, Any], at: dict[tuple[str, str], Any], path: Path) -> Path:
    rows = [r for r in result["rows"] if r["group"] == "scaling"]
    panels = [
        (title, [r for r in rows if r["key"].endswith(suffix)])
        for title, suffix in (
            ("mount", "-mount"),
            ("stat all, cold", "-stat-cold"),
            ("stat all, warm", "-stat-warm"),
        )
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    for ax, (title, prow) in zip(axes, panels, strict=True):
        for s in result["systems"]:
            pts = [(r["layers"], at.get((r["key"], s["key"]), {}).get("median")) for r in prow]
            pts = [(n, v) for n, v in pts if v]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s["title"], color=COLORS.get(s["key"]))
        ax.set_xscale("log", base=2)
        _log_y(ax)
        ax.set_xticks([r["layers"] for r in prow], [str(r["layers"]) for r in prow])
        ax.set_xlabel("lower layers")
        ax.set_ylabel("seconds (log)")
        ax.set_title(title)
        ax.grid(which="both", alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    axes[-1].legend(handles.values(), handles.keys(), fontsize=8)
    cfg = result["meta"]["config"]
    fig.suptitle(
        f"Scaling with lower layers: {cfg['scaling_files']} files, "
        f"median of {cfg['reps']} ({cfg['name']} set)"
    )
    fig.tight_layout()
    return _save(fig, path)


def _log_y(ax: Any) -> None:
    """A log axis labelled in plain numbers (0.02, 3) rather than powers of ten; call after plotting."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    # On a short axis label the 2 and 5 ticks too, or a single power of ten would be all it shows.
    if math.log10(high / low) < 2.5:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in (2, 5) else ""))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _mantissa(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _wrap(text: str, width: int = 22) -> str:
    words, lines, cur = text.split(" "), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return "\n".join([*lines, cur])


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
