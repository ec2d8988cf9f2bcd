"""The default image's root filesystem: Debian busybox-static's one binary plus
a symlink per applet, which is a whole userland. `make demo` imports it, and
the tests build their images from it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from common.errors import StrataError

BUSYBOX = "/bin/busybox"


def build_rootfs(top: Path, extra_dirs: Sequence[str] = (), files: Iterable[tuple[str, bytes]] = ()) -> Path:
    """Fill top with busybox, its applets, /etc/passwd and /etc/group, the usual
    empty mount points, the extra directories and the (path, content) files asked for."""
    if not os.path.exists(BUSYBOX):
        raise StrataError(f"{BUSYBOX} missing: apt-get install busybox-static")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", *extra_dirs):
        (top / d).mkdir(parents=True, exist_ok=True)
    (top / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, top / "bin/busybox")
    for applet in applets:
        if applet != "busybox":
            (top / "bin" / applet).symlink_to("busybox")
    (top / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (top / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for rel, content in files:
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return top
