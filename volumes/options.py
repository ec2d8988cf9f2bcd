"""Parsing the `-o key=value` options every driver shares (owner, mode, size).
Values arrive as strings from Docker; each is checked here once, so drivers only
ever see clean values."""

from __future__ import annotations

import re
from collections.abc import Mapping

from unionfs.errors import StrataError

MAX_VALUE = 4096
_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def check_options(opts: object) -> dict[str, str]:
    """Docker sends `Opts` as an object of strings, or null for none."""
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise StrataError(f"Opts must be an object of strings, not {type(opts).__name__}")
    clean: dict[str, str] = {}
    for key, value in opts.items():
        if not isinstance(value, str):
            raise StrataError(f"option {key}: value must be a string, not {type(value).__name__}")
        if "\0" in key or "\0" in value or len(value) > MAX_VALUE:
            raise StrataError(f"option {key!r}: NUL or value longer than {MAX_VALUE} characters")
        clean[key] = value
    return clean


def parse_size(value: str) -> int:
    """'64m', '1G', '1048576', '512KiB' -> bytes (binary units, as tmpfs and docker read them)."""
    m = _SIZE_RE.fullmatch(value.strip())
    if not m or int(m.group(1)) == 0:
        raise StrataError(f"invalid size {value!r}: expected a positive number with an optional k/m/g/t unit")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_id(key: str, value: str) -> int:
    if not value.isdigit() or int(value) >= 2**32 - 1:
        raise StrataError(f"invalid {key} {value!r}: expected a numeric id")
    return int(value)


def parse_mode(value: str) -> int:
    if not re.fullmatch(r"[0-7]{3,4}", value):
        raise StrataError(f"invalid mode {value!r}: expected octal permissions such as 0755")
    return int(value, 8)


def owner_and_mode(opts: Mapping[str, str], default_mode: int) -> tuple[int, int, int]:
    """(uid, gid, mode) for a volume's root directory, root-owned unless asked otherwise."""
    uid = parse_id("uid", opts["uid"]) if "uid" in opts else 0
    gid = parse_id("gid", opts["gid"]) if "gid" in opts else 0
    mode = parse_mode(opts["mode"]) if "mode" in opts else default_mode
    return uid, gid, mode
