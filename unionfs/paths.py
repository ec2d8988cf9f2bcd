"""Where strata keeps its state: one place decides, every package asks here."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_ROOT = "/var/lib/strata"
DEFAULT_RUN_ROOT = "/run/strata"


def state_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The persistent root: --root beats $STRATA_ROOT beats /var/lib/strata."""
    return Path(override or os.environ.get("STRATA_ROOT") or DEFAULT_STATE_ROOT)


def run_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Runtime state that must not survive a reboot (sockets, pid files)."""
    return Path(override or os.environ.get("STRATA_RUN_ROOT") or DEFAULT_RUN_ROOT)
