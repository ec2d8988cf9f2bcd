"""The volume service's administrator settings, read from one JSON file so the
`strata serve` daemon and `strata volume` commands enforce the same rules.

    {"bind_roots": ["/srv/volumes", "/data"], "unionfs": "/usr/local/sbin/strata-unionfs",
     "max_size": "100g"}

`bind_roots` lists the only host directories `type=bind` volumes may expose;
with none configured, bind volumes are refused. `max_size` caps the `size=` of any
volume; without it a size is capped only by what the volume's filesystem can hold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import StrataError
from common.parsing import load_json, parse_size

DEFAULT_CONFIG_PATH = "/etc/strata/volumes.json"


def config_path(override: str | os.PathLike[str] | None = None) -> Path:
    """--config beats $STRATA_VOLUMES_CONFIG beats /etc/strata/volumes.json."""
    return Path(override or os.environ.get("STRATA_VOLUMES_CONFIG") or DEFAULT_CONFIG_PATH)


@dataclass(frozen=True)
class VolumeConfig:
    bind_roots: tuple[Path, ...] = ()
    unionfs: str | None = None
    max_size: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> VolumeConfig:
        """The settings in the file; a missing file means the defaults (no bind roots)."""
        p = config_path(path)
        try:
            raw = load_json(p.read_bytes(), f"volume config {p}")
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise StrataError(f"cannot read volume config {p}: {e.strerror}") from None
        if not isinstance(raw, dict):
            raise StrataError(f"volume config {p}: expected a JSON object")
        unknown = set(raw) - {"bind_roots", "unionfs", "max_size"}
        if unknown:
            raise StrataError(f"volume config {p}: unknown setting(s) {', '.join(sorted(unknown))}")
        roots = raw.get("bind_roots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
            raise StrataError(f"volume config {p}: bind_roots must be a list of absolute paths")
        unionfs = raw.get("unionfs")
        if unionfs is not None and not isinstance(unionfs, str):
            raise StrataError(f"volume config {p}: unionfs must be a path")
        max_size = raw.get("max_size")
        if max_size is not None and not isinstance(max_size, str):
            raise StrataError(f"volume config {p}: max_size must be a size such as \"100g\"")
        return cls(
            bind_roots=tuple(Path(os.path.realpath(r)) for r in roots), unionfs=unionfs,
            max_size=parse_size(max_size, f"max_size in {p}") if max_size is not None else None,
        )
