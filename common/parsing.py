"""Parsing what arrives from outside, for every package: sizes and JSON, both bounded.

One grammar for sizes (`--memory 1.5g` and `-o size=1.5g` mean the same bytes) and one
JSON reader that refuses nesting before the parser sees it: CPython's decoder recurses
once per level, so a document nested 30,000 deep would otherwise end in RecursionError
instead of a one-line refusal, in whatever code walks the result next.
"""

from __future__ import annotations

import json
import re
from typing import Any

from common.errors import StrataError

# Above this no size means anything real, and the kernel parses sizes into 64-bit integers.
MAX_SIZE = (1 << 63) - 1
_SIZE_RE = re.compile(r"(\d+)(?:\.(\d+))? ?(?:([kmgtp])i?b?|b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

# Image manifests, configs and plugin requests are a handful of levels deep.
MAX_JSON_DEPTH = 100
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from docker's size grammar (its units.RAMInBytes): a number, a fraction
    allowed, an optional unit k, m, g, t or p (binary: 1k = 1024, an `i` and a `b` may
    follow), so '64m', '1.5g', '512KiB', '1048576'. Zero is a valid answer (callers that
    need more say so); anything from 8 EiB up is refused rather than wrapped."""
    shown = repr(text if len(text) <= 40 else text[:40] + "...")
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise StrataError(f"invalid {what} {shown}: expected a number with an optional unit k, m, g, t or p")
    whole, frac, unit = m.group(1), m.group(2) or "", (m.group(3) or "").lower()
    mult = _UNITS[unit]
    # Integer arithmetic throughout: no float rounding, and no conversion of a huge digit string.
    if len(whole.lstrip("0")) > len(str(MAX_SIZE)):
        raise StrataError(f"{what} {shown} is too large (the limit is 8 EiB)")
    frac = frac[:30]
    value = int(whole) * mult + (int(frac) * mult // 10 ** len(frac) if frac else 0)
    if value > MAX_SIZE:
        raise StrataError(f"{what} {shown} is too large (the limit is 8 EiB)")
    return value


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in a JSON text, counted without recursion
    (brackets inside strings do not count)."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(data: bytes | str, what: str) -> Any:
    """JSON from outside, or a one-line StrataError naming `what` it should have been:
    malformed, or nested deeper than MAX_JSON_DEPTH (refused before parsing)."""
    try:
        text = data if isinstance(data, str) else data.decode(json.detect_encoding(data), "surrogatepass")
    except UnicodeDecodeError:
        raise StrataError(f"{what}: malformed JSON (not UTF-8, UTF-16 or UTF-32)") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise StrataError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as e:
        raise StrataError(f"{what}: malformed JSON ({e})") from None
