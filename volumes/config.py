"""The volume service's administrator settings, read from one JSON file so the
`strata serve` daemon and `strata volume` commands enforce the same rules.

    {"bind_roots": ["/srv/volumes", "/data"], "unionfs": "/usr/local/sbin/strata-unionfs",
     "max_size": "100g"}

`bind_roots` lists the only host directories `type=bind` volumes may expose;
with none configured, bind volumes are refused. `max_size` caps the `size=` of any
volume; without it a size is capped only by what the volume's filesystem can hold.

An optional `cephfs` object points the shared (global-scope) backend at a Ceph
cluster; without it `strata serve` serves local volumes only (see `CephConfig`).
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


_CEPH_REQUIRED = ("monitors", "client", "keyring", "root")
_CEPH_KEYS = frozenset({*_CEPH_REQUIRED, "fs", "evict_client", "evict_keyring", "timeout"})


@dataclass(frozen=True)
class CephConfig:
    """Where the shared volumes live:

        "cephfs": {"monitors": "10.0.0.1:6789,10.0.0.2:6789", "fs": "cephfs", "root": "/strata",
                   "client": "client.strata", "keyring": "/etc/ceph/ceph.client.strata.keyring",
                   "evict_client": "client.admin", "evict_keyring": "/etc/ceph/ceph.client.admin.keyring",
                   "timeout": "8"}

    `root` is a directory of the filesystem `fs` that must exist; every volume is a
    directory below it. `client`/`keyring` mount it (`ceph fs authorize FS client.strata
    /strata rwp`: `p` lets it set quotas). `evict_client`/`evict_keyring` (default: the
    same) evict a dead ceph-fuse's session, which needs `mds 'allow *'`. `timeout`
    (seconds, default 8) bounds every wait on the cluster; a whole plugin call, which
    may wait several times (control mount, eviction, mount), answers within
    3 x timeout + 5 s (29 s by default)."""

    monitors: str
    client: str
    keyring: str
    root: str
    fs: str = "cephfs"
    evict_client: str = ""
    evict_keyring: str = ""
    timeout: float = 8.0

    @classmethod
    def parse(cls, raw: object, where: str) -> CephConfig:
        if not isinstance(raw, dict):
            raise StrataError(f"{where}: cephfs must be an object")
        unknown = set(raw) - _CEPH_KEYS
        if unknown:
            raise StrataError(f"{where}: unknown cephfs setting(s) {', '.join(sorted(unknown))}")
        missing = [k for k in _CEPH_REQUIRED if k not in raw]
        if missing:
            raise StrataError(f"{where}: cephfs needs {', '.join(missing)}")
        if not all(isinstance(v, str) and v and "\0" not in v for k, v in raw.items() if k != "timeout"):
            raise StrataError(f"{where}: every cephfs setting but timeout must be a non-empty string")
        if not raw["client"].startswith("client."):
            raise StrataError(f"{where}: cephfs client must be a client name such as client.strata")
        for key in ("keyring", "evict_keyring", "root"):
            if key in raw and not os.path.isabs(raw[key]):
                raise StrataError(f"{where}: cephfs {key} must be an absolute path")
        timeout = raw.get("timeout", cls.timeout)
        try:
            timeout = float(timeout) if isinstance(timeout, int | float | str) else 0.0
        except ValueError:
            timeout = 0.0
        if not 1 <= timeout <= 600:
            raise StrataError(f"{where}: cephfs timeout must be a number of seconds from 1 to 600")
        root = "/" + raw["root"].strip("/")
        return cls(
            monitors=raw["monitors"], client=raw["client"], keyring=raw["keyring"], root=root,
            fs=raw.get("fs", cls.fs), evict_client=raw.get("evict_client", raw["client"]),
            evict_keyring=raw.get("evict_keyring", raw["keyring"]), timeout=timeout,
        )


@dataclass(frozen=True)
class VolumeConfig:
    bind_roots: tuple[Path, ...] = ()
    unionfs: str | None = None
    max_size: int | None = None
    cephfs: CephConfig | None = None

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
        unknown = set(raw) - {"bind_roots", "unionfs", "max_size", "cephfs"}
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
            cephfs=CephConfig.parse(raw["cephfs"], f"volume config {p}") if "cephfs" in raw else None,
        )
