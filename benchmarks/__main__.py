"""`python -m benchmarks`: run the side-by-side benchmarks and write the results."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from common.errors import StrataError

from . import report, runner
from .config import FULL, QUICK
from .systems import ALL, BY_KEY

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run layer and copy-on-write workloads side by side on strata-unionfs, kernel overlayfs, "
        "fuse-overlayfs, unionfs-fuse and a plain directory (needs root).",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the full set (20,000-file tree, 256 MiB, 5 repetitions); "
        "default is the quick set, a few minutes",
    )
    p.add_argument(
        "--systems",
        default=",".join(s.key for s in ALL if s.key != "strata-baseline" or s.program()),
        help=f"comma-separated, from: {', '.join(BY_KEY)} (default: all; strata-baseline only when "
        "STRATA_BASELINE names another strata-unionfs to compare with)",
    )
    p.add_argument("--reps", type=int, help="repetitions (default: 3 quick, 5 full)")
    p.add_argument("--out", type=Path, help="results directory (default: benchmarks/results/<timestamp>)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the layers are built, removed afterwards (default: /var/tmp)",
    )
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="what to print when done: the Markdown table, or results.json",
    )
    return p.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every mount's clean-up, like Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    cfg = FULL if args.full else QUICK
    try:
        keys = [k.strip() for k in args.systems.split(",") if k.strip()]
        unknown = [k for k in keys if k not in BY_KEY]
        if unknown or not keys:
            raise StrataError(
                f"unknown system {', '.join(unknown) or '(none)'}; choose from {', '.join(BY_KEY)}"
            )
        if args.reps is not None:
            if args.reps < 1:
                raise StrataError("--reps must be at least 1")
            cfg = dataclasses.replace(cfg, reps=args.reps)
        out = args.out or RESULTS / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        if out.exists() and not out.is_dir():
            raise StrataError(f"--out {out}: exists and is not a directory")
        signal.signal(signal.SIGTERM, _terminate)
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        result = runner.run(cfg, [BY_KEY[k] for k in keys], args.workdir, log)
        paths = report.write(result, out)
    except StrataError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks: interrupted; every mount was taken down", file=sys.stderr)
        return 130
    if args.format == "json":
        print(paths[0].read_text(), end="")
    else:
        print(paths[1].read_text(), end="")
    print(f"results in {out}/: " + ", ".join(p.name for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
