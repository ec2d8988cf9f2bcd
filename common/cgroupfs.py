"""Where the cgroup hierarchies are mounted, and joining another process's cgroups.

The one reader of cgroup mounts (runtime.cgroups builds containers' cgroups on
it; the mount service moves each mount daemon into its caller's cgroups)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of each cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            fstype, _src, sopts = post.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((pre.split()[4], fstype, sopts))
    return out


def join_cgroups_of(pid: int) -> None:
    """Move this process into every cgroup `pid` is in (v1 hierarchies, named
    ones such as systemd's, and v2), so it is accounted, limited and stopped
    with that process's service, not with whoever started us. Best effort: a
    hierarchy it cannot enter is left as it is."""
    mounts = mountinfo()
    with open(f"/proc/{pid}/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        num, ctrls, path = line.split(":", 2)
        if num == "0":
            root = next((m for m, fstype, _ in mounts if fstype == "cgroup2"), None)
        else:
            wanted = set(ctrls.split(","))
            root = next((m for m, fstype, sopts in mounts
                         if fstype == "cgroup" and wanted <= set(sopts.split(","))), None)
        if root is None:
            continue
        with contextlib.suppress(OSError):
            (Path(root) / path.lstrip("/") / "cgroup.procs").write_text("0")
