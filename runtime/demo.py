"""`make demo`: strata end to end, narrated.

Builds the default image from Debian's busybox-static, runs a container whose root
is a strata-unionfs mount (the image layer below, the container's own layer above)
with a strata volume, writes to both, shows `diff` and the container layer in the
kernel overlayfs format, commits an image and runs it, and cleans up. Everything
lives in a private state root; the containers use `--network none`, so the host's
network is never touched."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from common.kernel import mounts
from runtime.busybox import build_rootfs
from unionfs import whiteout

STRATA = str(Path(sys.executable).with_name("strata"))


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def strata(root: Path, *args: str, show: bool = True) -> str:
    """Run the CLI as a user would, echoing the command and its output."""
    if show:
        print(f"$ strata {shlex.join(args)}", flush=True)
    res = subprocess.run([STRATA, "--root", str(root), *args], capture_output=True, text=True)
    if show and res.stdout:
        print(res.stdout, end="", flush=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"demo: `strata {' '.join(args)}` failed ({res.returncode})")
    return res.stdout


def describe(root: Path) -> None:
    """Every entry of a container layer with what it is, in the overlay on-disk format."""
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = os.lstat(p)
            if whiteout.is_whiteout(st):
                note = "whiteout (char 0/0): deleted from the image"
            elif stat.S_ISDIR(st.st_mode):
                note = "directory" + (", opaque" if whiteout.has_opaque_xattr(str(p)) else "")
            else:
                note = f"file, {st.st_size} bytes"
            print(f"  {p.relative_to(root)!s:<20} {note}")


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="strata-demo-"))
    root = base / "state"
    try:
        say("build the default image from Debian's busybox-static")
        build_rootfs(base / "rootfs", extra_dirs=["data"],
                     files=[("etc/motd", b"welcome to the busybox image\n")])
        strata(root, "import", str(base / "rootfs"), "busybox:latest")
        strata(root, "images")

        say("run a container: rootfs on strata-unionfs, a strata volume at /data")
        cid = strata(root, "run", "-d", "--name", "demo", "--network", "none", "--hostname", "demo",
                     "-v", "demo-data:/data", "busybox", "sh", "-c",
                     'echo "written in the container layer" > /hello.txt; rm /etc/motd; '
                     'echo "written to the volume" > /data/note.txt; echo ready; sleep 300').strip()
        for _ in range(100):
            if "ready" in strata(root, "logs", "demo", show=False):
                break
            subprocess.run(["sleep", "0.1"], check=True)
        strata(root, "ps")
        rec = json.loads(strata(root, "inspect", "demo", show=False))[0]
        merged = rec["GraphDriver"]["Data"]["MergedDir"]
        fstype = next(t for _, m, t, _ in mounts() if m == merged)
        print(f"the container's / is a {fstype} mount at {merged}")
        strata(root, "exec", "demo", "sh", "-c",
               'echo "PID 1 is: $(cat /proc/1/cmdline | tr "\\0" " ")"; hostname; '
               "cat /hello.txt /data/note.txt")

        say("what changed: `strata diff` reads the container layer")
        strata(root, "diff", "demo")
        print("the container layer on disk (kernel overlayfs format):")
        describe(Path(rec["GraphDriver"]["Data"]["UpperDir"]))
        strata(root, "volume", "ls")
        vol = json.loads(strata(root, "volume", "inspect", "demo-data", show=False))[0]
        print(f"the volume on disk, at {vol['Mountpoint']}:")
        describe(Path(vol["Mountpoint"]))

        say("stop it and commit its layer as a new image")
        strata(root, "stop", "-t", "1", "demo")
        strata(root, "commit", "-c", 'CMD ["cat", "/hello.txt"]', "demo", "busybox:demo")
        strata(root, "history", "busybox:demo")

        say("run the committed image; the volume's data is still there for a new container")
        strata(root, "run", "--rm", "--network", "none", "busybox:demo")
        strata(root, "run", "--rm", "--network", "none", "-v", "demo-data:/data", "busybox:demo",
               "sh", "-c", "ls /etc/motd 2>&1; cat /data/note.txt")

        say("clean up")
        strata(root, "rm", "demo")
        strata(root, "volume", "rm", "demo-data")
        strata(root, "rmi", "busybox:demo", "busybox:latest")
        strata(root, "system", "prune")
        left = [m for _, m, _, _ in mounts() if m.startswith(str(base))]
        assert not left, f"still mounted: {left}"
        assert not [p for p in (root / "containers").iterdir() if not p.name.startswith(".")]
        say(f"done: container {cid[:12]} came and went; nothing left mounted")
    finally:
        subprocess.run([STRATA, "--root", str(root), "system", "prune"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
