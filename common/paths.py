"""Where strata keeps its state: one place decides, every package asks here."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.dirwalk import O_DIR
from common.errors import StrataError

DEFAULT_STATE_ROOT = "/var/lib/strata"
DEFAULT_RUN_ROOT = "/run/strata"
# The state root and the directories on the way to a volume's mountpoint: their group may
# traverse but not list, as Docker keeps /var/lib/docker 0710, so that an administrator can
# chgrp them to a user-namespace-remapped root that must reach a mountpoint. Created by root,
# the group is root's: no other user gets through. Everything else of the state is 0700.
STATE_ROOT_MODE = 0o710


def state_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The persistent root: --root beats $STRATA_ROOT beats /var/lib/strata."""
    return Path(override or os.environ.get("STRATA_ROOT") or DEFAULT_STATE_ROOT)


def run_root(override: str | os.PathLike[str] | None = None) -> Path:
    """Runtime state that must not survive a reboot (sockets, pid files)."""
    return Path(override or os.environ.get("STRATA_RUN_ROOT") or DEFAULT_RUN_ROOT)


def private_dir(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """Make path a directory only root reaches, whatever the umask, and return it.

    Host users are hostile (a setuid file in a layer, a container or a volume must stay out
    of their reach), so every directory of the state root is created with `mode` exactly
    (0700, or 0710 on the way to something a client must traverse) and, when it already
    exists, tightened to at most `mode`, owned by us, without set-id or sticky bits. Missing
    parents are created the same way. The last component must not be a symlink (the state
    root's own path is the caller's: pass it resolved); a non-directory there is an error."""
    p = Path(path)
    missing: list[Path] = []
    q = p
    while not os.path.lexists(q) and q != q.parent:
        missing.append(q)
        q = q.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # made meanwhile by another strata process: fixed below like any existing one
        except OSError as e:
            raise StrataError(f"cannot create {d}: {e.strerror}") from None
        _tighten(d, mode, created=True)
    if not missing:
        _tighten(p, mode, created=False)
    return p


def _tighten(path: Path, mode: int, created: bool) -> None:
    try:
        fd = os.open(path, O_DIR)
    except OSError as e:
        raise StrataError(f"{path}: {e.strerror}; strata's state needs a real directory here") from None
    try:
        if created:
            # A set-gid parent would have handed its group (and its set-gid bit) down.
            os.fchown(fd, os.geteuid(), os.getegid())
        elif os.fstat(fd).st_uid != os.geteuid():
            os.fchown(fd, os.geteuid(), -1)
        now = stat.S_IMODE(os.fstat(fd).st_mode)
        want = mode if created else 0o700 | (now & mode)
        if now != want:
            os.fchmod(fd, want)
    finally:
        os.close(fd)
