"""Issue 10's attacks on strata-unionfs, as `nobody` (any host user who can write
in a mount) and as root (root in a container), against host canaries: a file and
a directory only root can reach, whose content, mode, owner and times must not
change and whose content must never be read back through the mount. The daemon
runs as root and must never follow a name someone swapped for a symlink, whether
in the upper (through the mount) or in a live lower (a clone's source).
Paths longer than PATH_MAX are compared with kernel overlayfs."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .support import daemon_pids, layer_dirs, mounted

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
CANARY_NAMES = ("f", "f0", "f1", "f2", "f3", "canary-only-name")

State = dict[str, tuple[object, ...]]


class Canaries:
    """A host file and a host directory (with files under the names the attacks aim at),
    root's alone (0600 / 0700), and what they were when made. Their content is upper
    case and everything the tests write is lower case, so that even a short read that
    got a canary's first bytes shows."""

    def __init__(self, root: Path) -> None:
        self.secret = b"CANARY-SECRET-" + os.urandom(8).hex().upper().encode()
        host = root / "host"
        host.mkdir(mode=0o700)
        self.file = host / "canary"
        self.file.write_bytes(self.secret + b"\n")
        self.dir = host / "canary_dir"
        self.dir.mkdir(mode=0o700)
        for name in CANARY_NAMES:
            (self.dir / name).write_bytes(self.secret + b" " + name.upper().encode() + b"\n")
        for p in (self.file, *(self.dir / n for n in CANARY_NAMES)):
            os.chmod(p, 0o600)
        for p in (self.file, self.dir, *(self.dir / n for n in CANARY_NAMES)):
            os.utime(p, ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)
        self.before = self.state()

    def state(self) -> State:
        out: State = {}
        for p in (self.file, self.dir, *sorted(self.dir.iterdir())):
            st = os.lstat(p)
            content: object = sorted(os.listdir(p)) if p.is_dir() else p.read_bytes()
            out[str(p)] = (content, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                           st.st_ctime_ns, st.st_ino)
        return out

    def assert_unchanged(self) -> None:
        after = self.state()
        changed = {p: (self.before.get(p), after.get(p)) for p in set(self.before) | set(after)
                   if self.before.get(p) != after.get(p)}
        assert not changed, f"host canaries changed: {changed}"

    @staticmethod
    def leaked(got: object) -> bool:
        """Whether a result holds canary bytes (upper case) or a canary dir's listing."""
        if isinstance(got, bytes | str):
            data = got.encode() if isinstance(got, str) else got
            return b"canary-only-name" in data or any(0x41 <= c <= 0x5A for c in data)
        if isinstance(got, list | tuple):
            return any(Canaries.leaked(x) for x in got)
        return False


def reachable_by_nobody(tmp_path: Path) -> None:
    """Let other users traverse down to tmp_path (pytest's base dir is 0700)."""
    for d in (tmp_path, *tmp_path.parents):
        if d == Path("/tmp") or d == Path("/"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o011)


def world_writable(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o1777)


@pytest.fixture
def canaries(tmp_path: Path) -> Canaries:
    return Canaries(tmp_path)


@contextlib.contextmanager
def plain_mount(tmp_path: Path, kind: str = "strata") -> Iterator[tuple[Path, Path, Path]]:
    """A mount (lower, upper, mountpoint) whose lower dir `tmp` is mode 1777."""
    reachable_by_nobody(tmp_path)
    (lower,), upper, work, mnt = layer_dirs(tmp_path / kind, 1)
    world_writable(lower / "tmp")
    with mounted(kind, [lower], upper, work, mnt):
        yield lower, upper, mnt


def run_as(user: str, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["sh", "-c", script]
    return subprocess.run(AS_NOBODY + cmd if user == "nobody" else cmd, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def attack_both(tmp_path: Path, canaries: Canaries, user: str, script: str) -> tuple[str, str]:
    """Run script in mnt/tmp on kernel overlayfs (the reference, where the canaries do not
    change either), then on strata (whose daemon must survive it); both outputs."""
    out = {}
    for kind in ("kernel", "strata"):
        with plain_mount(tmp_path, kind) as (_, _, mnt):
            r = run_as(user, script, mnt / "tmp")
            assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), f"the attack did not run: {r}"
            if kind == "kernel":
                assert not canaries.leaked(r.stdout)
                canaries.assert_unchanged()
            else:
                daemon_alive(mnt)
            out[kind] = r.stdout
    return out["kernel"], out["strata"]


def daemon_alive(mnt: Path) -> None:
    assert daemon_pids(mnt), "the daemon is gone"
    os.statvfs(mnt)
    os.listdir(mnt)


# ---- (a) a stale path after unlink -----------------------------------------------------------------


@pytest.mark.parametrize("user", ["nobody", "root"])
def test_unlinked_open_file_never_reaches_a_planted_symlink(tmp_path: Path, canaries: Canaries,
                                                            user: str) -> None:
    """exec 3<>v; rm v; ln -s CANARY v; then chmod/append/truncate/touch/cat through
    /proc/self/fd/3: each must act on the unlinked file (or fail), never on the canary."""
    script = f"""
        exec 3<>v && echo mine >&3 && rm v && ln -s {canaries.file} v || exit 3
        echo "read: $(cat /proc/self/fd/3 | tr '\\n' '|')"
        chmod 644 /proc/self/fd/3; echo "chmod: $?"
        chown {NOBODY} /proc/self/fd/3 2>/dev/null; echo "chown: $?"
        echo x >> /proc/self/fd/3; echo "append: $?"
        touch -d @2000000000 /proc/self/fd/3; echo "touch: $?"
        echo "read: $(cat /proc/self/fd/3 | tr '\\n' '|')"
        truncate -s 1 /proc/self/fd/3; echo "truncate: $?"
        echo "read: $(cat /proc/self/fd/3 | tr '\\n' '|')"
        echo done
    """
    kernel, strata = attack_both(tmp_path, canaries, user, script)
    assert kernel.startswith("read: mine|\nchmod: 0\n") and "read: mine|x|\n" in kernel, kernel
    assert not canaries.leaked(strata), f"the canary's content came back through the mount: {strata!r}"
    canaries.assert_unchanged()
    assert strata == kernel, "the unlinked file does not behave as on the kernel"


# ---- (b) a stale hard-link alias after a directory rename ----------------------------------------------


@pytest.mark.parametrize("user", ["nobody", "root"])
def test_hard_link_alias_after_dir_rename_is_not_followed(tmp_path: Path, canaries: Canaries,
                                                          user: str) -> None:
    """mkdir e; echo x>g; ln g e/f; mv e e2; rm g; ln -s CANARY_DIR e; echo pwn > e2/f
    (repeated: it is racy on the kernel's inode cache)."""
    script = f"""
        for i in 1 2 3 4 5 6 7 8; do
            mkdir e$i && echo x > g$i && ln g$i e$i/f && mv e$i e2_$i && rm g$i && ln -s {canaries.dir} e$i \\
                || exit 3
            echo "read: $(cat e2_$i/f)"
            echo pwn > e2_$i/f; echo "write: $?"
            chmod 600 e2_$i/f; echo "chmod: $?"
            echo "read: $(cat e2_$i/f)"
        done
        echo done
    """
    kernel, strata = attack_both(tmp_path, canaries, user, script)
    assert kernel == "read: x\nwrite: 0\nchmod: 0\nread: pwn\n" * 8 + "done\n", kernel
    assert not canaries.leaked(strata), f"the canary's content came back through the mount: {strata!r}"
    canaries.assert_unchanged()
    assert strata == kernel, "the hard link does not behave as on the kernel"


# ---- (e) a live lower (a clone's source) changed under the mount -----------------------------------


@pytest.mark.parametrize("looked_up", ["listed", "stat", "opened"])
def test_lower_dir_swapped_for_a_symlink_is_not_followed(tmp_path: Path, canaries: Canaries,
                                                         looked_up: str) -> None:
    """ls mnt/d; on the host mv lower/d lower/d.old; ln -s CANARY_DIR lower/d; cat mnt/d/f:
    an error or the old content, never the canary's."""
    (lower,), upper, work, mnt = layer_dirs(tmp_path / "fs", 1)
    (lower / "d").mkdir()
    (lower / "d/f").write_text("old f\n")
    (lower / "g").write_text("old g\n")
    with mounted("strata", [lower], upper, work, mnt):
        assert sorted(os.listdir(mnt / "d")) == ["f"]
        if looked_up in ("stat", "opened"):
            os.stat(mnt / "d/f")
            os.stat(mnt / "g")
        if looked_up == "opened":
            assert (mnt / "d/f").read_text() == "old f\n"
        os.rename(lower / "d", lower / "d.old")
        os.symlink(canaries.dir, lower / "d")
        os.rename(lower / "g", lower / "g.old")
        os.symlink(canaries.file, lower / "g")
        seen: list[object] = [read_nofollow(mnt, rel) for rel in ("d/f", "g", "d/canary-only-name")]
        with contextlib.suppress(OSError), nofollow_dir(mnt, "d") as fd:
            seen.append(os.listdir(fd))
        for got in seen:
            assert not canaries.leaked(got), f"the host canary came through the mount: {got!r}"
        for rel, old in (("d/f", b"old f\n"), ("g", b"old g\n")):
            got = read_nofollow(mnt, rel)
            assert isinstance(got, int) or got == old, f"{rel}: {got!r}"
        daemon_alive(mnt)
    canaries.assert_unchanged()


@contextlib.contextmanager
def nofollow_dir(mnt: Path, rel: str) -> Iterator[int]:
    """A directory fd for mnt/rel reached without following a symlink in any component,
    so that the test process, root on the host, never reaches a canary by itself."""
    fds = [os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for d in filter(None, rel.split("/")):
            fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        yield fds[-1]
    finally:
        for fd in fds:
            os.close(fd)


def read_nofollow(mnt: Path, rel: str) -> bytes | int:
    """mnt/rel's content, reached without following any symlink; an errno on failure."""
    parent, _, name = rel.rpartition("/")
    try:
        with nofollow_dir(mnt, parent) as dfd:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                return os.read(fd, 1 << 16)
            finally:
                os.close(fd)
    except OSError as e:
        return e.errno or -1


# ---- (c) paths longer than PATH_MAX -----------------------------------------------------------------

NAME_LEN = 200
DEPTH = 21  # 21 * 201 bytes: every path below the deepest lower dir is longer than PATH_MAX


def long_name(i: int) -> str:
    return f"{i:03d}".ljust(NAME_LEN, "x")


def build_deep(lower: Path) -> None:
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(DEPTH):
        os.mkdir(long_name(i), dir_fd=fd)
        nfd = os.open(long_name(i), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    wfd = os.open("lower.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(wfd, b"lower\n")
    os.close(wfd)
    os.close(fd)


def deep_ops(mnt: Path) -> list[tuple[str, object]]:
    """Every kind of call below a path longer than PATH_MAX, relative to directory fds."""
    out: list[tuple[str, object]] = []
    fds: list[int] = [os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)]

    def step(name: str, fn: Callable[[], object]) -> object:
        try:
            r = fn()
            out.append((name, "ok" if r is None else r))
            return r
        except OSError as e:
            out.append((name, errno.errorcode.get(e.errno or 0, e.errno)))
            return None

    def descend(name: str, create: bool) -> int:
        if create:
            os.mkdir(name, dir_fd=fds[-1])
        fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        return fds[-1]

    def write(name: str, flags: int, data: bytes) -> object:
        fd = os.open(name, os.O_WRONLY | flags, 0o644, dir_fd=d)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    def read(name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY, dir_fd=d)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    try:
        step("walk lower chain", lambda: [descend(long_name(i), False) for i in range(DEPTH)] and None)
        if out[-1][1] != "ok":
            return out
        d = fds[-1]
        proc = f"/proc/self/fd/{d}"
        step("stat lower file", lambda: os.stat("lower.txt", dir_fd=d).st_size)
        step("read lower file", lambda: read("lower.txt"))
        step("stat missing", lambda: os.stat("missing", dir_fd=d) and None)
        step("open missing below", lambda: os.open("missing/deeper", os.O_RDONLY, dir_fd=d) and None)
        step("mkdir", lambda: os.mkdir("sub", dir_fd=d))
        step("create", lambda: write("new", os.O_CREAT | os.O_EXCL, b"new data\n"))
        step("read new", lambda: read("new"))
        step("append lower", lambda: write("lower.txt", os.O_APPEND, b"more\n"))
        step("read lower again", lambda: read("lower.txt"))
        step("link", lambda: os.link("new", "new.link", src_dir_fd=d, dst_dir_fd=d))
        step("link lower", lambda: os.link("lower.txt", "lower.link", src_dir_fd=d, dst_dir_fd=d))
        step("nlink", lambda: os.stat("new", dir_fd=d).st_nlink)
        step("rename", lambda: os.rename("new.link", "renamed", src_dir_fd=d, dst_dir_fd=d))
        step("rename into sub", lambda: os.rename("renamed", "sub/renamed", src_dir_fd=d, dst_dir_fd=d))
        step("chown", lambda: os.chown("new", 1000, 1001, dir_fd=d, follow_symlinks=False))
        step("chmod", lambda: os.chmod("new", 0o600, dir_fd=d))
        step("owner", lambda: (lambda st: (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))(
            os.stat("new", dir_fd=d)))
        step("truncate", lambda: os.truncate(f"{proc}/new", 3))
        step("truncate lower", lambda: os.truncate(f"{proc}/lower.link", 2))
        step("sizes", lambda: (os.stat("new", dir_fd=d).st_size, os.stat("lower.txt", dir_fd=d).st_size))
        step("utime", lambda: os.utime("new", ns=(1, 2), dir_fd=d))
        step("setxattr", lambda: os.setxattr(f"{proc}/new", "user.k", b"v"))
        step("getxattr", lambda: os.getxattr(f"{proc}/new", "user.k"))
        step("symlink", lambda: os.symlink("new", "sl", dir_fd=d))
        step("readlink", lambda: os.readlink("sl", dir_fd=d))
        step("mkfifo", lambda: os.mkfifo("fifo", dir_fd=d))
        step("listdir", lambda: sorted(os.listdir(d)))
        step("unlink", lambda: os.unlink("sub/renamed", dir_fd=d))
        step("unlink lower", lambda: os.unlink("lower.link", dir_fd=d))
        step("rmdir", lambda: os.rmdir("sub", dir_fd=d))
        step("mkdir 3 deeper", lambda: [descend(long_name(100 + i), True) for i in range(3)] and None)
        step("create deeper", lambda: os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, 0o644,
                                                       dir_fd=fds[-1])))
        step("listdir deeper", lambda: os.listdir(fds[-1]))
        step("mkdir chain", lambda: os.mkdir("nd", dir_fd=d))
        step("rename new dir", lambda: os.rename("nd", "nd2", src_dir_fd=d, dst_dir_fd=d))
        step("rmdir new dir", lambda: os.rmdir("nd2", dir_fd=d))
        step("listdir end", lambda: sorted(os.listdir(d)))
    finally:
        for fd in fds:
            os.close(fd)
    return out


def test_paths_longer_than_path_max_work_as_on_the_kernel(tmp_path: Path) -> None:
    seen = {}
    for kind in ("kernel", "strata"):
        (lower,), upper, work, mnt = layer_dirs(tmp_path / kind, 1)
        build_deep(lower)
        assert len(str(upper)) + DEPTH * (NAME_LEN + 1) > 4096
        with mounted(kind, [lower], upper, work, mnt):
            seen[kind] = deep_ops(mnt)
    k = dict(seen["kernel"])
    assert len(k) == len(seen["kernel"]) == 38, "a step is missing on the kernel"
    assert {n: v for n, v in k.items() if v == "ENOENT"} == {"stat missing": "ENOENT",
                                                            "open missing below": "ENOENT"}
    assert k["read lower again"] == b"lower\nmore\n" and k["sizes"] == (3, 2)
    assert k["listdir end"] == [long_name(100), "fifo", "lower.txt", "new", "sl"]
    mismatch = [(n, v, k.get(n)) for n, v in seen["strata"] if k.get(n) != v]
    assert not mismatch and len(seen["strata"]) == len(seen["kernel"]), \
        f"(step, strata, kernel) differ: {mismatch[:8]}"


# ---- (d) randomized: a workload, an attacker in the mount, a writer in the live lower --------------

DURATION = 10.0
DIRS = [f"d{j}" for j in range(3)]
FILES = [f"f{k}" for k in range(4)]


def in_child_as_nobody(fn: Callable[[], dict[str, object]]) -> tuple[int, int]:
    """Fork; the child drops to nobody, runs fn and writes its JSON result to a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            result = fn()
            code = 0
        except BaseException as e:
            result = {"crash": repr(e)}
        try:
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


class Tally:
    """What a loop saw: errnos by name, failures that were no OSError with an errno, leaks."""

    def __init__(self, canaries: Canaries) -> None:
        self.canaries = canaries
        self.ops = 0
        self.errnos: dict[str, int] = {}
        self.bad: list[str] = []
        self.leaks: list[str] = []

    def run(self, what: str, fn: Callable[[], object]) -> object:
        self.ops += 1
        try:
            got = fn()
        except OSError as e:
            if e.errno is None:
                self.bad.append(f"{what}: {e!r}")
            else:
                name = errno.errorcode.get(e.errno, str(e.errno))
                self.errnos[name] = self.errnos.get(name, 0) + 1
            return None
        except Exception as e:
            self.bad.append(f"{what}: {e!r}")
            return None
        if self.canaries.leaked(got):
            self.leaks.append(f"{what}: {got!r}"[:200])
        return got

    def result(self) -> dict[str, object]:
        return {"ops": self.ops, "errnos": self.errnos, "bad": self.bad[:10], "leaks": self.leaks[:10]}


def _read(p: str) -> bytes:
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _write(p: str, flags: int, data: bytes) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | flags, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def workload(mnt: str, until: float, canaries: Canaries) -> dict[str, object]:
    """Ordinary use of the mount: create, write, read, rename, unlink, list, in a loop.
    It never follows a symlink itself in the last component (O_NOFOLLOW), and as nobody
    it cannot enter the canary dir: any canary byte it sees came through the daemon."""
    rnd = random.Random(1)
    t = Tally(canaries)
    names = [f"w/{f}" for f in FILES] + [f"src/{d}/{f}" for d in DIRS for f in FILES] + \
        [f"src/{f}" for f in FILES]
    while time.monotonic() < until:
        p = os.path.join(mnt, rnd.choice(names))
        parent = os.path.dirname(p)
        ops: list[tuple[str, Callable[[], object]]] = [
            ("create", functools.partial(_write, p, os.O_CREAT | os.O_TRUNC, b"work\n")),
            ("append", functools.partial(_write, p, os.O_APPEND, b"more\n")),
            ("read", functools.partial(_read, p)),
            ("read", functools.partial(_read, p)),
            ("rename", functools.partial(os.rename, p, os.path.join(parent, rnd.choice(FILES)))),
            ("unlink", functools.partial(os.unlink, p)),
            ("list", functools.partial(os.listdir, parent)),
            ("stat", functools.partial(os.lstat, p)),
            ("mkdir", functools.partial(os.mkdir, os.path.join(mnt, "w", rnd.choice(DIRS)))),
        ]
        t.run(*rnd.choice(ops))
    return t.result()


def stale_fd_attack(t: Tally, v: str, target: str) -> None:
    """exec 3<>v; rm v; ln -s TARGET v; then act on the file through fd 3 and /proc/self/fd/3."""
    fd = t.run("open v", lambda: os.open(v, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644))
    if not isinstance(fd, int):
        return
    proc = f"/proc/self/fd/{fd}"
    try:
        t.run("unlink v", lambda: os.unlink(v))
        t.run("plant", lambda: os.symlink(target, v))
        t.run("fchmod", lambda: os.fchmod(fd, 0o666))
        t.run("chmod proc", lambda: os.chmod(proc, 0o644))
        t.run("append proc", lambda: _write(proc, os.O_APPEND, b"pwn\n"))
        t.run("read proc", lambda: _read(proc))
        t.run("utime proc", lambda: os.utime(proc, (2_000_000_000, 2_000_000_000)))
        t.run("truncate proc", lambda: os.truncate(proc, 1))
        t.run("setxattr proc", lambda: os.setxattr(proc, "user.pwn", b"1"))
    finally:
        t.run("close", lambda: os.close(fd))  # a FUSE close reports flush errors
    t.run("cleanup", lambda: os.unlink(v))


def alias_attack(t: Tally, e: str, e2: str, g: str, target: str) -> None:
    """mkdir e; echo x>g; ln g e/f; mv e e2; rm g; ln -s TARGET e; then use e2/f."""
    t.run("mkdir e", lambda: os.mkdir(e))
    t.run("g", lambda: _write(g, os.O_CREAT, b"x\n"))
    t.run("link", lambda: os.link(g, os.path.join(e, "f")))
    t.run("mv e e2", lambda: os.rename(e, e2))
    t.run("rm g", lambda: os.unlink(g))
    t.run("plant", lambda: os.symlink(target, e))
    t.run("read alias", lambda: _read(os.path.join(e2, "f")))
    t.run("write alias", lambda: _write(os.path.join(e2, "f"), os.O_TRUNC, b"pwn\n"))
    t.run("chmod alias", lambda: os.chmod(os.path.join(e2, "f"), 0o666))
    t.run("cleanup", lambda: os.unlink(e))
    t.run("cleanup", lambda: os.unlink(os.path.join(e2, "f")))
    t.run("cleanup", lambda: os.rmdir(e2))


def dir_swap_attack(t: Tally, d: str, target: str, inside: str, pause: float) -> None:
    """mv d d.x; ln -s TARGET d; read d.x/INSIDE; then put d back."""
    t.run("mv dir", lambda: os.rename(d, d + ".x"))
    t.run("plant dir", lambda: os.symlink(target, d))
    t.run("read through", lambda: _read(os.path.join(d + ".x", inside)))
    time.sleep(pause)
    t.run("unplant dir", lambda: os.unlink(d))
    t.run("mv dir back", lambda: os.rename(d + ".x", d))


def file_swap_attack(t: Tally, p: str, target: str) -> None:
    t.run("unlink file", lambda: os.unlink(p))
    t.run("plant file", lambda: os.symlink(target, p))


def attacker(mnt: str, until: float, canaries: Canaries) -> dict[str, object]:
    """The known attacks, over and over, in random order: an unlinked open file whose name
    becomes a symlink, a hard-link alias behind a renamed directory, directories renamed
    and replaced by symlinks to the canary dir, files replaced by symlinks to the canary."""
    rnd = random.Random(2)
    t = Tally(canaries)
    n = 0
    w = os.path.join(mnt, "w")
    targets = [str(canaries.file), *(str(canaries.dir / name) for name in CANARY_NAMES)]
    while time.monotonic() < until:
        n += 1
        kind = rnd.randrange(4)
        if kind == 0:
            stale_fd_attack(t, os.path.join(w, f"v{n}"), rnd.choice(targets))
        elif kind == 1:
            alias_attack(t, os.path.join(w, f"e{n}"), os.path.join(w, f"e2_{n}"), os.path.join(w, f"g{n}"),
                         str(canaries.dir))
        elif kind == 2:
            d = os.path.join(mnt, "src", rnd.choice(DIRS))
            dir_swap_attack(t, d, str(canaries.dir), rnd.choice(FILES), rnd.random() / 100)
        else:
            where = rnd.choice(["w", "src", f"src/{rnd.choice(DIRS)}"])
            file_swap_attack(t, os.path.join(mnt, where, rnd.choice(FILES)), rnd.choice(targets))
    return t.result()


def swap_in_lower(t: Tally, p: Path, target: Path, pause: float, rewrite: Path | None) -> None:
    old = p.with_name(p.name + ".old")
    t.run("swap", lambda: os.rename(p, old))
    t.run("plant", lambda: os.symlink(target, p))
    time.sleep(pause)
    t.run("unplant", lambda: os.unlink(p))
    t.run("swap back", lambda: os.rename(old, p))
    if rewrite is not None:
        t.run("rewrite", lambda: _write(str(rewrite), os.O_CREAT | os.O_TRUNC, b"changed\n"))


def lower_writer(lower: Path, until: float, canaries: Canaries, t: Tally) -> None:
    """The clone-source case, on the host: a live lower whose directories and files are
    swapped for symlinks to the canaries and back, and whose files are rewritten."""
    rnd = random.Random(3)
    src = lower / "src"
    while time.monotonic() < until:
        name = rnd.choice(DIRS + FILES)
        if name in DIRS:
            swap_in_lower(t, src / name, canaries.dir, rnd.random() / 50, src / name / rnd.choice(FILES))
        else:
            swap_in_lower(t, src / name, canaries.file, rnd.random() / 50, None)


def test_randomized_attack(tmp_path: Path, canaries: Canaries) -> None:
    """For DURATION seconds a workload and an attacker (both nobody) use the mount while the
    host swaps the live lower's names for symlinks to the canaries: afterwards the canaries
    are unchanged and were never read, the daemon answers, no loop hung, and every failure
    was an OSError with an errno."""
    reachable_by_nobody(tmp_path)
    (lower,), upper, work, mnt = layer_dirs(tmp_path / "fs", 1)
    for d in ("w", "src", *(f"src/{d}" for d in DIRS)):
        (lower / d).mkdir(parents=True, exist_ok=True)
        os.chown(lower / d, NOBODY, NOBODY)
    for f in [f"src/{f}" for f in FILES] + [f"src/{d}/{f}" for d in DIRS for f in FILES]:
        (lower / f).write_text(f"lower {f}\n")
        os.chown(lower / f, NOBODY, NOBODY)
    with mounted("strata", [lower], upper, work, mnt):
        until = time.monotonic() + DURATION
        children = {name: in_child_as_nobody(functools.partial(fn, str(mnt), until, canaries))
                    for name, fn in (("workload", workload), ("attacker", attacker))}
        host = Tally(canaries)
        writer = threading.Thread(target=lower_writer, args=(lower, until, canaries, host), daemon=True)
        writer.start()
        results: dict[str, dict[str, object]] = {}
        hung: list[str] = []
        for name, (pid, rfd) in children.items():
            results[name] = collect(pid, rfd, until + 20, hung, name)
        writer.join(timeout=30)
        assert not hung, f"hung (a request never answered?): {hung}"
        assert not writer.is_alive(), "the lower writer hung"
        daemon_alive(mnt)
        results["lower writer"] = host.result()
    print({name: (res.get("ops"), res.get("errnos")) for name, res in results.items()})
    for name, res in results.items():
        assert "crash" not in res, f"{name} crashed: {res}"
        assert res["leaks"] == [], f"{name} read a canary through the mount: {res['leaks']}"
        assert res["bad"] == [], f"{name} saw failures without an errno: {res['bad']}"
    assert isinstance(results["workload"]["ops"], int) and results["workload"]["ops"] > 100
    canaries.assert_unchanged()


def collect(pid: int, rfd: int, deadline: float, hung: list[str], name: str) -> dict[str, object]:
    """A child's JSON result; past the deadline it is killed and counted as hung."""
    data = b""
    try:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([rfd], [], [], max(left, 0))
            if not ready:
                hung.append(name)
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    return json.loads(data) if data else {"crash": "no result"}
