"""`make demo`: strata end to end, narrated.

Today it shows the storage driver: two image layers mounted with
strata-unionfs under a writable container layer, changed through the mount
(a lower file edited, one deleted, a directory replaced), then the merged view
beside what landed in the upper dir, and the same upper mounted by the
kernel's overlayfs to show the on-disk format is the kernel's.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from unionfs.kernel import is_mountpoint

STRATA_UNIONFS = str(Path(sys.executable).with_name("strata-unionfs"))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def sh(cmd: str) -> None:
    print(f"$ {cmd}", flush=True)
    subprocess.run(cmd, shell=True, check=True)


def describe(root: Path) -> None:
    """Every entry with what it is, marking the overlay's own bookkeeping."""
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = p.relative_to(root)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                note = "whiteout (char 0/0)"
            elif stat.S_ISDIR(st.st_mode):
                opaque = "trusted.overlay.opaque" in os.listxattr(p, follow_symlinks=False)
                note = "directory" + (", opaque (trusted.overlay.opaque=y)" if opaque else "")
            elif stat.S_ISLNK(st.st_mode):
                note = f"symlink -> {os.readlink(p)}"
            else:
                note = f"file: {p.read_text().strip()!r}"
            print(f"  {rel!s:<28} {note}")


def build_layers(base: Path) -> tuple[Path, Path]:
    bottom, top = base / "layer0", base / "layer1"
    for d in ("etc", "app/config", "var/cache"):
        (bottom / d).mkdir(parents=True)
    (bottom / "etc/motd").write_text("welcome to the base image")
    (bottom / "etc/hostname").write_text("base")
    (bottom / "app/config/settings.ini").write_text("debug = false")
    (bottom / "app/config/defaults.ini").write_text("level = 1")
    (bottom / "var/cache/blob").write_text("cached bytes")
    (top / "app").mkdir(parents=True)
    (top / "app/run.sh").write_text("#!/bin/sh\necho running")
    (top / "etc").mkdir()
    (top / "etc/motd").write_text("welcome to the app image")
    return bottom, top


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="strata-demo-") as tmp:
        base = Path(tmp)
        bottom, top = build_layers(base)
        upper, work, merged = base / "container/diff", base / "container/work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        say("two image layers, and an empty container layer")
        print("layer1 (top):")
        describe(top)
        print("layer0 (bottom):")
        describe(bottom)
        say("mount them with strata-unionfs, as podman would")
        sh(f"{STRATA_UNIONFS} -o lowerdir={top}:{bottom},upperdir={upper},workdir={work} {merged}")
        try:
            say("the merged view")
            describe(merged)
            say("change it through the mount")
            sh(f"echo 'debug = true' > {merged}/app/config/settings.ini   # edit a lower file: copy-up")
            sh(f"rm {merged}/etc/hostname                                # delete a lower file: whiteout")
            sh(f"rm -r {merged}/var/cache && mkdir {merged}/var/cache    # replace a dir: opaque")
            sh(f"echo fresh > {merged}/var/cache/new")
            sh(f"mv {merged}/app/config {merged}/app/conf.d               # rename a lower dir")
            say("the merged view now")
            describe(merged)
            say("what landed in the container layer (the upper dir): the kernel overlayfs format")
            describe(upper)
            say("the lower layers are untouched")
            describe(bottom)
        finally:
            sh(f"fusermount3 -u {merged}")
        say("the same upper through the kernel's own overlayfs")
        sh(f"mount -t overlay overlay -o lowerdir={top}:{bottom},upperdir={upper},workdir={work} {merged}")
        try:
            describe(merged)
        finally:
            sh(f"umount {merged}")
        assert not is_mountpoint(merged)
        say("done: nothing left mounted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
