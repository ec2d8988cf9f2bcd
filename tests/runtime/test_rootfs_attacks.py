"""Issue 10's attacks on strata-unionfs as root in a strata container (the rootfs is a
strata-unionfs mount whose daemon runs as root on the host): a name the container swaps for
a symlink to a host path must never be followed by the daemon. The host canaries are a
root-only file and directory under the test's tmp_path; their content, mode, owner, times
and inode must not change, their content must never come back, and the container and its
mount must be gone after `run --rm`. tests/unionfs/test_attacks.py runs the same attacks
on a plain mount (as nobody and as root) against kernel overlayfs."""

from __future__ import annotations

import os
import shlex
import stat
import time
from pathlib import Path

import pytest

from runtime import cgroups
from tests.runtime.conftest import IMAGE, Strata, _leftovers

CANARY_NAMES = ("f", "motd", "group", "canary-only-name")
MARK = "%"
OLD = 1_000_000_000  # the canaries' atime and mtime (2001), so that any touch shows

TIMEOUT = 20  # seconds for one attack container, start to removal

State = dict[str, tuple[object, ...]]


class Canaries:
    """A 0600 file and a 0700 directory (holding 0600 files under the names the attacks aim
    at) in a 0700 directory, all root's. Their content starts with MARK, which no output of
    the scripts holds, so that even a short read of a canary (the kernel asks the daemon for as
    many bytes as the size it believes the file has, 2 for "x\\n") shows."""

    def __init__(self, root: Path) -> None:
        self.secret = MARK * 16 + "CANARY-" + os.urandom(8).hex().upper()
        host = root / "host"
        host.mkdir(mode=0o700)
        self.file = host / "canary"
        self.file.write_text(self.secret + "\n")
        self.dir = host / "canary_dir"
        self.dir.mkdir(mode=0o700)
        for name in CANARY_NAMES:
            (self.dir / name).write_text(f"{self.secret} {name.upper()}\n")
        for p in (self.file, *self.dir.iterdir()):
            os.chmod(p, 0o600)
        for p in (self.file, *self.dir.iterdir(), self.dir, host):
            os.utime(p, ns=(OLD, OLD), follow_symlinks=False)
        self.before = self.state()

    def paths(self) -> list[Path]:
        return [self.file.parent, self.file, self.dir, *sorted(self.dir.iterdir())]

    def state(self) -> State:
        out: State = {}
        for p in self.paths():
            st = os.lstat(p)
            content: object = sorted(os.listdir(p)) if stat.S_ISDIR(st.st_mode) else p.read_bytes()
            out[str(p)] = (stat.S_IFMT(st.st_mode), content, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                           st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        return out

    def check(self, res_out: str, res_err: str) -> None:
        after = self.state()
        changed = {p: (self.before.get(p), after.get(p)) for p in set(self.before) | set(after)
                   if self.before.get(p) != after.get(p)}
        assert not changed, \
            f"host canaries changed, (type, content, mode, uid, gid, mtime, ctime, ino): {changed}"
        for name, text in (("stdout", res_out), ("stderr", res_err)):
            assert MARK not in text and "canary-only-name" not in text, \
                f"the canary's content came back through the container's {name}: {text!r}"


@pytest.fixture
def canaries(tmp_path: Path) -> Canaries:
    return Canaries(tmp_path)


@pytest.fixture(params=["strata-unionfs", "overlay"])
def driver(request: pytest.FixtureRequest) -> str:
    """strata-unionfs, and the kernel's overlayfs as the reference the expected outputs come from."""
    return str(request.param)


def attack(strata: Strata, canaries: Canaries, driver: str, script: str) -> str:
    """Run script as root in a `run --rm` container on driver (bounded in time), then check the canaries,
    the output and that nothing of the container is left; its stdout after its first line."""
    body = (f"CANARY={shlex.quote(str(canaries.file))}; CANARY_DIR={shlex.quote(str(canaries.dir))}\n"
            f"hostname\n{script}")
    res = strata("run", "--rm", "--storage-driver", driver, IMAGE, "sh", "-c", body, check=False,
                 timeout=TIMEOUT)
    canaries.check(res.stdout, res.stderr)
    assert res.returncode == 0 and res.stdout.endswith("done\n"), \
        f"the attack did not run to its end (exit {res.returncode}): {res.stdout!r} {res.stderr!r}"
    short_id, _, out = res.stdout.partition("\n")
    assert len(short_id) == 12, res.stdout
    assert strata("ps", "-a", "-q").stdout == "", "run --rm left its container"
    assert_cleaned_up(strata, short_id)
    return out


def assert_cleaned_up(strata: Strata, short_id: str) -> None:
    """After `run --rm`: no mount, daemon, veth, cgroup or directory of the container (the bridge stays
    until prune, as in every runtime test)."""
    deadline = time.monotonic() + 10
    while True:
        left = [x for x in _leftovers(strata.root, strata.netns, set()) if x != "link strata0"]
        left += [f"cgroup {cg.version} {cg.name}" for cg in cgroups.leftovers()
                 if cg.name.startswith(short_id)]
        left += [f"container dir {p.name}" for p in (strata.root / "containers").iterdir()
                 if p.name.startswith(short_id)]
        if not left:
            return
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.1)


# What an attack does through fd 3, whose name ($NAME) was replaced by a symlink to a canary.
THROUGH_FD3 = """
    echo "read: $(cat /proc/self/fd/3 | tr '\\n' '|')"
    chmod 644 /proc/self/fd/3; echo "chmod: $?"
    chown 65534:65534 /proc/self/fd/3; echo "chown: $?"
    echo x >> /proc/self/fd/3; echo "append: $?"
    touch -d @2000000000 /proc/self/fd/3; echo "touch: $?"
    echo "read: $(cat /proc/self/fd/3 | tr '\\n' '|')"
    truncate -s 0 /proc/self/fd/3; echo "truncate: $?"
    echo "read: $(cat /proc/self/fd/3 | tr '\\n' '|')"
    echo "name: $(cat $NAME 2>&1)"
    exec 3<&-
"""


def through_fd3(content: str, name: str, writable: bool = True) -> str:
    """THROUGH_FD3's output on kernel overlayfs, for a file holding content (one line)."""
    if not writable:  # an unlinked lower file cannot be copied up: every change fails
        return (f"read: {content}|\nchmod: 1\nchown: 1\nappend: 1\ntouch: 1\nread: {content}|\ntruncate: 1\n"
                f"read: {content}|\nname: cat: can't open '{name}': No such file or directory\n")
    return (f"read: {content}|\nchmod: 0\nchown: 0\nappend: 0\ntouch: 0\nread: {content}|x|\ntruncate: 0\n"
            f"read: \nname: cat: can't open '{name}': No such file or directory\n")


# ---- (a) a stale path after unlink -----------------------------------------------------------------


def test_unlinked_open_file_never_reaches_a_planted_symlink(strata: Strata, canaries: Canaries,
                                                            driver: str) -> None:
    """exec 3<>v; rm v; ln -s CANARY v; then chmod/chown/append/touch/truncate/cat through
    /proc/self/fd/3, in directories new in the upper and of the image's layer; then the same
    with the open file's directory renamed and its name made a symlink to the canary dir."""
    out = attack(strata, canaries, driver, f"""
        for d in /tmp /tmp/new /root; do
            mkdir -p $d && cd $d || exit 3
            NAME=v; echo data > v && exec 3<>v && rm v && ln -s "$CANARY" v || exit 3
            {THROUGH_FD3}
        done
        for d in /tmp/d /root/d; do
            mkdir $d && cd $d && echo data > f && exec 3<>f && cd .. && mv d d.old && ln -s "$CANARY_DIR" d \\
                || exit 3
            NAME=d/f; {THROUGH_FD3}
        done
        echo done
    """)
    assert out == through_fd3("data", "v") * 3 + through_fd3("data", "d/f") * 2 + "done\n"


# ---- (b) a stale hard-link alias after a directory rename ----------------------------------------------


def test_hard_link_alias_after_dir_rename_is_not_followed(strata: Strata, canaries: Canaries,
                                                          driver: str) -> None:
    """mkdir e; echo x>g; ln g e/f; mv e e2; rm g; ln -s CANARY_DIR e; echo pwn > e2/f, with
    fresh names several times (racy on the kernel's inode cache)."""
    out = attack(strata, canaries, driver, """
        cd /tmp || exit 3
        for i in 1 2 3 4 5 6 7 8; do
            mkdir e$i && echo x > g$i && ln g$i e$i/f && mv e$i e2_$i && rm g$i && ln -s "$CANARY_DIR" e$i \\
                || exit 3
            echo "read: $(cat e2_$i/f)"
            echo pwn > e2_$i/f; echo "write: $?"
            chmod 600 e2_$i/f; echo "chmod: $?"
            touch -d @2000000000 e2_$i/f; echo "touch: $?"
            echo "read: $(cat e2_$i/f)"
            ls -la e2_$i | grep -c ' f$'
        done
        echo done
    """)
    assert out == "read: x\nwrite: 0\nchmod: 0\ntouch: 0\nread: pwn\n1\n" * 8 + "done\n"


# ---- (c) both, where the image's layer holds the files and directories (copy-up) ----------------------


def test_unlinked_lower_file_never_reaches_a_planted_symlink(strata: Strata, canaries: Canaries,
                                                             driver: str) -> None:
    """(a) on files of the image's layer: /etc/motd opened read-write (copied up at the open),
    /etc/group opened read-only (its copy-up, asked for by the chmod through the fd after the
    name was replaced, must fail); then on a new file in /bin, a big directory of the image."""
    out = attack(strata, canaries, driver, f"""
        cd /etc || exit 3
        NAME=motd; exec 3<>motd && rm motd && ln -s "$CANARY" motd || exit 3
        {THROUGH_FD3}
        NAME=group; exec 3<group && rm group && ln -s "$CANARY" group || exit 3
        {THROUGH_FD3}
        cd /bin || exit 3
        NAME=v; echo data > v && exec 3<>v && rm v && ln -s "$CANARY" v || exit 3
        {THROUGH_FD3}
        echo done
    """)
    assert out == (through_fd3("image motd", "motd")
                   + through_fd3("root:x:0:|nogroup:x:65534:", "group", writable=False)
                   + through_fd3("data", "v") + "done\n")


def test_hard_link_to_lower_file_after_lower_dir_rename_is_not_followed(strata: Strata, canaries: Canaries,
                                                                        driver: str) -> None:
    """(b) with files of the image's layer as g (copied up by the link) and, as e, a new
    directory and directories of the image's layer (their rename copies them up)."""
    out = attack(strata, canaries, driver, """
        for pair in /etc/new:/etc/motd /data:/etc/group /root:/etc/passwd; do
            e=${pair%%:*}; g=${pair#*:}
            case $e in /etc/new) mkdir $e || exit 3;; esac
            ln $g $e/f && mv $e $e.2 && rm $g && ln -s "$CANARY_DIR" $e || exit 3
            echo "read: $(head -c 5 $e.2/f)"
            echo pwn > $e.2/f; echo "write: $?"
            chmod 600 $e.2/f; echo "chmod: $?"
            touch -d @2000000000 $e.2/f; echo "touch: $?"
            echo "read: $(cat $e.2/f)"
            ls -la $e.2 | grep -c ' f$'
        done
        echo done
    """)
    assert out == "".join(f"read: {head}\nwrite: 0\nchmod: 0\ntouch: 0\nread: pwn\n1\n"
                          for head in ("image", "root:", "root:")) + "done\n"
