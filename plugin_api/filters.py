"""containerd's filter syntax, as `ctr ... ls` and the snapshots API's Walk take it.

A request carries a list of filters; a snapshot is listed if it matches any of them. One
filter is selectors joined by `,`, all of which must match. A selector is a field path
(`name`, `parent`, `kind`, `labels.KEY`; a component may be double-quoted, so
`labels."containerd.io/gc.root"`), optionally an operator (`==`, `!=`, `~=` for a regular
expression) and a value (bare up to the next `,`, or double-quoted with backslash escapes).
Without an operator the selector asks that the field be present and non-empty. The
semantics follow containerd's filters package (filters/filter.go): `==` needs the field
present, `!=` and `~=` compare whatever value the field has ("" when absent).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.errors import StrataError

# A filter longer than this is refused: it comes from a client, and the regex compiles.
MAX_FILTER = 4096
_OPERATORS = ("==", "!=", "~=")
_BARE_FIELD = re.compile(r"[A-Za-z0-9_\-/]+")

Fields = Callable[[Sequence[str]], str | None]


class FilterError(StrataError):
    """A filter that does not parse; str() names the problem."""


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    operator: str  # "" (present), "==", "!=", "~="
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, fields: Fields) -> bool:
        value = fields(self.path)
        if self.operator == "":
            return bool(value)
        if self.operator == "==":
            return value is not None and value == self.value
        if self.operator == "!=":
            return (value or "") != self.value
        assert self.regex is not None
        return self.regex.search(value or "") is not None


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, what: str) -> FilterError:
        return FilterError(f"invalid filter {self.text!r}: {what} at position {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def quoted(self) -> str:
        """A double-quoted string with backslash escapes, the opening quote at pos."""
        out: list[str] = []
        self.pos += 1
        while not self.done():
            c = self.text[self.pos]
            self.pos += 1
            if c == '"':
                return "".join(out)
            if c == "\\":
                if self.done():
                    break
                e = self.text[self.pos]
                self.pos += 1
                out.append({"n": "\n", "t": "\t", "r": "\r"}.get(e, e))
            else:
                out.append(c)
        raise self.error("unterminated quoted string")

    def field(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted()
        m = _BARE_FIELD.match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted()
        end = self.text.find(",", self.pos)
        end = len(self.text) if end < 0 else end
        raw, self.pos = self.text[self.pos:end].strip(), end
        if not raw:
            raise self.error("expected a value")
        return raw


def parse(text: str) -> list[Selector]:
    """One filter: its selectors, all of which must match."""
    if len(text) > MAX_FILTER:
        raise FilterError(f"filter longer than {MAX_FILTER} characters")
    sc = _Scanner(text)
    selectors = []
    while True:
        path = [sc.field()]
        while sc.peek("."):
            sc.pos += 1
            path.append(sc.field())
        sc.skip_space()
        op = next((o for o in _OPERATORS if sc.peek(o)), "")
        value, regex = "", None
        if op:
            sc.pos += len(op)
            value = sc.value()
            if op == "~=":
                try:
                    regex = re.compile(value)
                except re.error as e:
                    raise FilterError(f"invalid filter {text!r}: bad regular expression: {e}") from None
        selectors.append(Selector(tuple(path), op, value, regex))
        sc.skip_space()
        if sc.done():
            return selectors
        if not sc.peek(","):
            raise sc.error("expected ',' or an operator")
        sc.pos += 1


def matcher(filters: Sequence[str]) -> Callable[[Fields], bool]:
    """Whether an item (its fields) matches any of the filters; no filter matches all."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda fields: True
    return lambda fields: any(all(s.match(fields) for s in sels) for sels in parsed)
