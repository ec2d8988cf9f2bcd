"""Content addresses: sha256 digests checked while bytes stream past, and the
DiffID → ChainID rule, so nothing read from outside is trusted unverified."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from typing import BinaryIO

from common.errors import StrataError

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    """A digest from outside names a file in the store, so its form is checked first."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise StrataError(f"invalid digest {digest!r} (want sha256:<64 hex>)")
    return digest


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, expected: str, what: str) -> bytes:
    """Return data if it hashes to expected, else refuse it."""
    actual = sha256_bytes(data)
    if actual != check_digest(expected):
        raise StrataError(f"digest mismatch for {what}: expected {expected}, got {actual}")
    return data


def chain_id(parent: str | None, diff_id: str) -> str:
    """ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(n))."""
    check_digest(diff_id)
    return diff_id if parent is None else sha256_bytes(f"{parent} {diff_id}".encode())


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(chain_id(out[-1] if out else None, diff_id))
    return out


class DigestingReader(io.RawIOBase):
    """Hashes (and optionally copies to `sink`) every byte read through it; `verify()` at the end."""

    def __init__(self, raw: BinaryIO, sink: BinaryIO | None = None) -> None:
        super().__init__()
        self._raw, self._sink = raw, sink
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self._hash.update(data)
        if self._sink is not None:
            self._sink.write(data)
        self.size += n
        return n

    def drain(self) -> None:
        """Read to the end so the digest covers the whole stream (tar padding included)."""
        while self.read(1 << 20):
            pass

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def verify(self, expected: str | None, what: str) -> str:
        actual = self.digest()
        if expected is not None and actual != check_digest(expected):
            raise StrataError(f"digest mismatch for {what}: expected {expected}, got {actual}")
        return actual


class DigestingWriter(io.RawIOBase):
    """Hashes everything written on its way to `raw`, so a blob we produce knows its own digest."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._raw.write(data)
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
