"""What a volume name and a mount ID may be. A name becomes one path component
under the volume root, so this check is what keeps clients inside it."""

from __future__ import annotations

import re

from common.errors import StrataError

# Docker's rule for volume names; the leading alphanumeric also rules out ".", ".." and our
# own dot-prefixed bookkeeping entries in the volume root.
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
MAX_NAME = 255  # one path component
MAX_ID = 1024


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise StrataError(f"volume name must be a string, not {type(name).__name__}")
    if not name:
        raise StrataError("volume name is empty")
    if len(name.encode()) > MAX_NAME:
        raise StrataError(f"volume name is too long ({len(name.encode())} bytes, limit {MAX_NAME})")
    if not _NAME_RE.fullmatch(name):
        raise StrataError(
            f"invalid volume name {name!r}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]+ (2 characters or more)"
        )
    return name


def check_mount_id(mount_id: object) -> str:
    """Docker sends a random 64-hex string per mount; any non-empty text without NUL will do,
    it is only ever a key in the state file."""
    if not isinstance(mount_id, str):
        raise StrataError(f"mount ID must be a string, not {type(mount_id).__name__}")
    if not mount_id:
        raise StrataError("mount ID is empty")
    if len(mount_id) > MAX_ID or "\0" in mount_id:
        raise StrataError(f"invalid mount ID (NUL or longer than {MAX_ID} characters)")
    return mount_id
