"""Parsing the `-o key=value` options every driver shares (owner, mode, size).
Values arrive as strings from Docker; each is checked here once, so drivers only
ever see clean values."""

from __future__ import annotations

import re
from collections.abc import Mapping

from common.errors import StrataError
from common.parsing import parse_size

MAX_VALUE = 4096


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


def check_size(value: str, room: int, where: str, maximum: int | None) -> int:
    """A volume's `size=` in bytes (the project's one size grammar, common.parsing): more
    than zero, at most the administrator's `max_size`, and at most `room`, what the
    volume's filesystem (named by `where`) can hold, so a size limit can never promise space that is not
    there (a sparse image larger than the disk fails its writes only when the disk is full)."""
    size = parse_size(value)
    if size == 0:
        raise StrataError(f"invalid size {value!r}: a volume needs more than 0 bytes")
    if maximum is not None and size > maximum:
        raise StrataError(f"size {value} is over the administrator's maximum ({maximum} bytes, max_size)")
    if size > room:
        raise StrataError(f"size {value} is more than {where} ({room} bytes)")
    return size


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
