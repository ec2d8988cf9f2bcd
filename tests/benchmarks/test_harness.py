"""Smoke test of the benchmark harness: a tiny but real run on kernel overlayfs
and the plain directory, checked through the files it writes."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from benchmarks import report, runner
from benchmarks.config import Config
from benchmarks.systems import BY_KEY
from common import kernel

TINY = Config(
    name="tiny",
    tree_files=120,
    tree_dirs=6,
    big_mib=2,
    create_files=50,
    rm_files=20,
    fio_reads=64,
    scaling_files=60,
    stall_mib=8,
    small_files=40,
    layer_counts=(1, 8),
    reps=2,
    timeout=60.0,
)
SYSTEMS = ("overlayfs", "plain")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    if os.geteuid() != 0:
        pytest.fail("the benchmark harness needs root (mounts, drop_caches); run the tests as root")
    work = tmp_path_factory.mktemp("work")
    out = tmp_path_factory.mktemp("out")
    logged: list[str] = []
    result = runner.run(TINY, [BY_KEY[k] for k in SYSTEMS], work, logged.append)
    report.write(result, out)
    assert any("rep 2/2" in line for line in logged), "no progress was reported"
    return result, work, out


def _positive(v: object) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_json_has_every_row_with_real_numbers(run_dir: tuple[dict, Path, Path]) -> None:
    _, _, out = run_dir
    data = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    expected = {"mount", "find-cold", "find-warm", "stat-cold", "stat-warm", "dd-cold", "dd-warm", "fio-warm",
                "tar-warm", "tar-small-warm", "tar-small-cold", "dd-cold-ro", "dd-warm-ro", "tar-warm-ro",
                "copy-up", "stall-p99", "stall-max", "create", "rm"}  # fmt: skip
    expected |= {f"layers{n}-{m}" for n in TINY.layer_counts for m in ("mount", "stat-cold", "stat-warm")}
    assert set(rows) == expected
    cells = {(c["workload"], c["system"]): c for c in data["cells"]}
    for key, row in rows.items():
        for system in SYSTEMS:
            c = cells.get((key, system))
            if system == "plain" and key.endswith("mount"):
                assert c is None, "a plain directory has no mount to time"
                continue
            assert c is not None, (key, system)
            assert c["error"] is None, (key, system, c["error"])
            assert c["n"] == TINY.reps
            assert all(_positive(c[f]) for f in ("median", "min", "max")), c
            assert c["min"] <= c["median"] <= c["max"]
            assert _positive(c["ratio_overlayfs"]), c
            assert c["ratio_fuse-overlayfs"] is None  # not run here
        assert row["title"]
    assert cells[("find-warm", "overlayfs")]["ratio_overlayfs"] == 1.0
    samples = [s for s in data["samples"] if s["system"] == "overlayfs"]
    assert all(_positive(s["mount_seconds"]) for s in samples)


def test_markdown_table_rows(run_dir: tuple[dict, Path, Path]) -> None:
    result, _, out = run_dir
    md = (out / "results.md").read_text()
    assert "tiny set" in md
    number = r"\d+(\.\d+)?(e-\d+)?"
    for row in result["rows"]:
        line = next((ln for ln in md.splitlines() if ln.startswith(f"| {row['title']} |")), None)
        assert line is not None, row["title"]
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        assert len(cells) == len(SYSTEMS)
        for c in cells:
            assert c == "n/a" or re.match(number, c), line
            if c != "n/a":
                assert float(c.split()[0]) > 0, line
    assert "error" not in md.lower()


def test_charts_and_cleanup(run_dir: tuple[dict, Path, Path]) -> None:
    _, work, out = run_dir
    for name in ("mount", "metadata", "read", "write", "scaling"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not [t for _, t, _, _ in kernel.mounts() if t.startswith(f"{work}/")]
    assert list(work.iterdir()) == [], "the run left data behind"
