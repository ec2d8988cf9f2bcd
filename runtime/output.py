"""How the `strata` CLI shows things: aligned tables, JSON for scripts, and
progress bars for long work (on a terminal only, so logs stay clean)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None) -> None:
    """Print rows under headers in columns two spaces apart, docker style."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def print_json(value: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(value, out, indent=2, sort_keys=True, default=str)
    out.write("\n")


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """A one-line progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str, total: int | None = None, out: TextIO | None = None) -> None:
        # Streams are looked up now, not at import, so a redirected sys.stderr is honoured.
        self.label, self.total, self.done, self.out = label, total, 0, out or sys.stderr
        self.enabled = self.out.isatty()
        self._last = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            self.out.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {human_size(self.done)}")
        else:
            self.out.write(f"\r{self.label} {human_size(self.done)}")
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.out.write("\n")
            self.out.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
