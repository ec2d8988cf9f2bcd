"""The unix sockets plugin_api's services listen on: taking over a dead predecessor's
socket (and never anything else), and telling systemd (Type=notify) that one listens."""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from common.errors import StrataError

log = logging.getLogger("strata.plugin")


def claim_socket(path: Path) -> None:
    """Remove a stale socket left by a killed server; refuse if a live one answers, and
    never remove anything that is not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StrataError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise StrataError(f"another server is already listening on {path}")


def notify_systemd(message: bytes) -> None:
    """sd_notify(3) for Type=notify units: the engine ordered after us (dockerd, containerd)
    starts only once we listen."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message, addr)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", addr, e)
