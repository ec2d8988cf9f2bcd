"""Issue 10's semantic points, side by side with kernel overlayfs over identical
layers: what an application sees after a copy-up, O_DIRECT, renameat2 flags,
fallocate, holes, inode numbers across a remount, `.` and `..`, whiteout-like
names and devices, and the uppers a lower-directory rename leaves behind.
Each test first checks the kernel's answer (so the test itself is right), then
that strata-unionfs gives the same one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .support import layer_dirs, mounted, snapshot

T = TypeVar("T")
Setup = tuple[list[Path], Path, Path, Path]
Tree = dict[str, tuple[object, ...]]
KINDS = ("kernel", "strata")

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
MiB = 1 << 20


def _raise_errno(what: object) -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e), str(what))


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)):
        _raise_errno(src)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)):
        _raise_errno(fd)


def fallocate_path(path: Path, mode: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fallocate(fd, mode, 0, length)
    finally:
        os.close(fd)


def outcome(fn: Callable[[], object]) -> object:
    """What a call answered: its value ('ok' for None) or its errno's name."""
    try:
        r = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, e.errno)
    return "ok" if r is None else r


def setups(tmp_path: Path, build: Callable[[Path], None]) -> dict[str, Setup]:
    """One lower layer per filesystem, built the same way."""
    out = {}
    for kind in KINDS:
        out[kind] = layer_dirs(tmp_path / kind, 1)
        build(out[kind][0][0])
    return out


def on_both(tmp_path: Path, build: Callable[[Path], None], fn: Callable[[Path], T],
            extra: dict[str, str] | None = None) -> tuple[dict[str, T], dict[str, Setup]]:
    """fn's result on a kernel and on a strata mount of the same layers."""
    results = {}
    dirs = setups(tmp_path, build)
    for kind, (lowers, upper, work, mnt) in dirs.items():
        with mounted(kind, lowers, upper, work, mnt, extra=(extra or {}).get(kind, "")):
            results[kind] = fn(mnt)
    return results, dirs


def view(setup: Setup, reader: str, extra: str = "") -> Tree:
    """The tree an upper shows when `reader` mounts it (work dir cleared first)."""
    lowers, upper, work, mnt = setup
    shutil.rmtree(work)
    work.mkdir()
    with mounted(reader, lowers, upper, work, mnt, extra=extra):
        return snapshot(mnt)


def unreadable_entries(root: Path) -> list[str]:
    """Names a listing shows that lstat cannot find (`ls -l` prints them as c?????????)."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                bad.append(os.path.relpath(os.path.join(dirpath, name), root))
    return bad


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def build_lf(lower: Path) -> None:
    (lower / "lf").write_bytes(b"lower\n")
    (lower / "lf2").write_bytes(b"lower data, longer\n")
    (lower / "d").mkdir()
    (lower / "d/lf").write_bytes(b"in d\n")
    (lower / "d/lf2").write_bytes(b"also in d\n")
    (lower / "e").mkdir()


# ---- stale data after copy-up ---------------------------------------------------------------------


def test_copy_up_is_seen_by_earlier_fds_and_later_opens(tmp_path: Path) -> None:
    """A reader opened (and its pages cached) before a writer copies the file up
    reads the new data, and so does every later open."""
    def run(mnt: Path) -> tuple[object, ...]:
        r = os.open(mnt / "lf", os.O_RDONLY)
        r2 = os.open(mnt / "lf2", os.O_RDONLY)
        try:
            first = (os.pread(r, 64, 0), os.pread(r2, 64, 0))
            w = os.open(mnt / "lf", os.O_WRONLY)
            os.pwrite(w, b"UPPER", 0)
            os.close(w)
            w = os.open(mnt / "lf2", os.O_WRONLY | os.O_TRUNC)
            os.write(w, b"new")
            os.close(w)
            return (first, os.pread(r, 64, 0), (mnt / "lf").read_bytes(),
                    os.pread(r2, 64, 0), os.fstat(r2).st_size, (mnt / "lf2").read_bytes())
        finally:
            os.close(r)
            os.close(r2)

    seen, _ = on_both(tmp_path, build_lf, run)
    assert seen["kernel"] == ((b"lower\n", b"lower data, longer\n"), b"UPPER\n", b"UPPER\n",
                              b"new", 3, b"new")
    assert seen["strata"] == seen["kernel"], "stale data after copy-up"


# ---- O_DIRECT ------------------------------------------------------------------------------------


def build_direct(lower: Path) -> None:
    (lower / "big").write_bytes(bytes(range(256)) * 64)  # 16 KiB


def test_o_direct_reads_and_writes(tmp_path: Path) -> None:
    pattern = bytes(reversed(range(256))) * 64

    def run(mnt: Path) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        buf = mmap.mmap(-1, len(pattern))  # page-aligned, as O_DIRECT wants
        buf[:] = pattern

        def write_new() -> object:
            fd = os.open(mnt / "x", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
            try:
                return os.pwritev(fd, [buf], 0)
            finally:
                os.close(fd)

        def read(name: str) -> object:
            fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT)
            try:
                rb = mmap.mmap(-1, len(pattern))
                n = os.preadv(fd, [rb], 0)
                return n, rb[:n] == (mnt / name).read_bytes()[:n], rb[:8]
            finally:
                os.close(fd)

        def write_lower() -> object:
            fd = os.open(mnt / "big", os.O_WRONLY | os.O_DIRECT)
            try:
                return os.pwritev(fd, [memoryview(buf)[:4096]], 4096)
            finally:
                os.close(fd)

        out.append(("dd oflag=direct", subprocess.run(
            ["dd", "if=/dev/zero", f"of={mnt}/dd", "bs=4k", "count=4", "oflag=direct"],
            capture_output=True).returncode))
        out.append(("dd iflag=direct", subprocess.run(
            ["dd", f"if={mnt}/dd", "of=/dev/null", "bs=4k", "iflag=direct"], capture_output=True).returncode))
        out.append(("write new", outcome(write_new)))
        out.append(("read new", outcome(lambda: read("x"))))
        out.append(("read lower", outcome(lambda: read("big"))))
        out.append(("write lower", outcome(write_lower)))
        out.append(("after", (mnt / "big").read_bytes()[4090:4100]))
        return out

    seen, _ = on_both(tmp_path, build_direct, run)
    expect = [("dd oflag=direct", 0), ("dd iflag=direct", 0), ("write new", 16384),
              ("read new", (16384, True, pattern[:8])), ("read lower", (16384, True, bytes(range(8)))),
              ("write lower", 4096), ("after", bytes(range(256))[250:256] + pattern[:4])]
    assert seen["kernel"] == expect
    assert seen["strata"] == seen["kernel"], "O_DIRECT differs from the kernel"


# ---- renameat2 -----------------------------------------------------------------------------------


def test_rename_exchange_and_noreplace(tmp_path: Path) -> None:
    def run(mnt: Path) -> tuple[object, ...]:
        (mnt / "nf").write_bytes(b"new\n")
        ino = {n: os.stat(mnt / n).st_ino for n in ("nf", "lf", "lf2", "d/lf")}
        results = [
            ("exchange new/lower", outcome(lambda: renameat2(mnt / "nf", mnt / "lf", RENAME_EXCHANGE))),
            ("exchange lower/lower", outcome(lambda: renameat2(mnt / "lf2", mnt / "d/lf", RENAME_EXCHANGE))),
            ("exchange missing", outcome(lambda: renameat2(mnt / "nf", mnt / "nope", RENAME_EXCHANGE))),
            ("noreplace existing", outcome(lambda: renameat2(mnt / "nf", mnt / "lf", RENAME_NOREPLACE))),
            ("noreplace lower dir", outcome(lambda: renameat2(mnt / "nf", mnt / "d", RENAME_NOREPLACE))),
            ("noreplace free", outcome(lambda: renameat2(mnt / "nf", mnt / "fresh", RENAME_NOREPLACE))),
            ("both flags", outcome(lambda: renameat2(mnt / "lf", mnt / "fresh", 3))),
        ]
        contents = {n: (mnt / n).read_bytes() for n in ("lf", "fresh", "lf2", "d/lf")}
        inos_follow = (os.stat(mnt / "lf").st_ino == ino["nf"], os.stat(mnt / "fresh").st_ino == ino["lf"],
                       os.stat(mnt / "lf2").st_ino == ino["d/lf"], os.stat(mnt / "d/lf").st_ino == ino["lf2"])
        return results, contents, inos_follow, sorted(os.listdir(mnt)), snapshot(mnt)

    seen, dirs = on_both(tmp_path, build_lf, run)
    k = seen["kernel"]
    assert k[0] == [("exchange new/lower", "ok"), ("exchange lower/lower", "ok"),
                    ("exchange missing", "ENOENT"), ("noreplace existing", "EEXIST"),
                    ("noreplace lower dir", "EEXIST"), ("noreplace free", "ok"), ("both flags", "EINVAL")]
    assert k[1] == {"lf": b"new\n", "fresh": b"lower\n", "lf2": b"in d\n", "d/lf": b"lower data, longer\n"}
    assert k[2] == (True, True, True, True)
    s = seen["strata"]
    assert s[0] == k[0], "renameat2 answered differently"
    assert s[1:4] == k[1:4], "contents, inode numbers or listing differ after the renames"
    assert s[4] == k[4]
    assert view(dirs["strata"], "kernel") == k[4], "strata's upper looks different through the kernel"


# ---- fallocate -----------------------------------------------------------------------------------


def build_falloc(lower: Path) -> None:
    (lower / "lf").write_bytes(b"x" * MiB)


def test_fallocate(tmp_path: Path) -> None:
    def run(mnt: Path) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        r = subprocess.run(["fallocate", "-l", "1M", str(mnt / "f")], capture_output=True, text=True)
        out.append(("fallocate -l 1M", (r.returncode, r.stderr.strip() and "error")))
        for name, mode in (("g", 0), ("k", FALLOC_FL_KEEP_SIZE)):
            out.append((f"mode {mode}", outcome(functools.partial(fallocate_path, mnt / name, mode, MiB))))
        fd = os.open(mnt / "lf", os.O_RDWR)  # a lower file: copy-up, then punch
        try:
            out.append(("punch lower", outcome(
                lambda: fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, MiB // 2))))
        finally:
            os.close(fd)
        for name in ("f", "g", "k", "lf"):
            st = os.stat(mnt / name)
            out.append((name, (st.st_size, st.st_blocks * 512 >= MiB // 2, st.st_blocks * 512 >= MiB)))
        data = (mnt / "lf").read_bytes()
        half = MiB // 2
        out.append(("punched data", (data[:half] == bytes(half), data[half:] == b"x" * half)))
        return out

    seen, _ = on_both(tmp_path, build_falloc, run)
    assert seen["kernel"] == [
        ("fallocate -l 1M", (0, "")), ("mode 0", "ok"), ("mode 1", "ok"), ("punch lower", "ok"),
        ("f", (MiB, True, True)), ("g", (MiB, True, True)), ("k", (0, True, True)),
        ("lf", (MiB, True, False)), ("punched data", (True, True))]
    assert seen["strata"] == seen["kernel"], "fallocate differs from the kernel"


# ---- holes ---------------------------------------------------------------------------------------


def build_sparse(lower: Path, size: int) -> None:
    with open(lower / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(size // 2)
        f.write(b"middle")
        f.truncate(size)
        os.fsync(f.fileno())  # allocated on disk, so both filesystems copy up the same layout


def test_copy_up_keeps_holes(tmp_path: Path) -> None:
    size = 256 * MiB

    def run(mnt: Path) -> tuple[object, ...]:
        with open(mnt / "sparse", "ab") as f:
            f.write(b"!")
        with open(mnt / "sparse", "rb") as f:
            head = f.read(4)
            f.seek(size // 2)
            middle = f.read(6)
            f.seek(size - 4)
            tail = f.read()
        return os.stat(mnt / "sparse").st_size, head, middle, tail

    seen, dirs = on_both(tmp_path, lambda lower: build_sparse(lower, size), run)
    assert seen["kernel"] == (size + 1, b"head", b"middle", b"\0\0\0\0!")
    assert seen["strata"] == seen["kernel"]
    # The kernel copies in 1 MiB chunks and skips the holes between them: 2 MiB here.
    used = {kind: os.stat(dirs[kind][1] / "sparse").st_blocks * 512 for kind in KINDS}
    assert used["kernel"] <= 4 * MiB
    assert used["strata"] <= 4 * MiB, f"the copy-up filled the holes: {used['strata']} bytes in the upper"


def append_byte(path: Path) -> int:
    with open(path, "ab") as f:
        f.write(b"!")
    return os.stat(path).st_size


def test_sparse_copy_up_fits_a_small_upper(tmp_path: Path) -> None:
    """Appending to a 1 GiB sparse lower file needs a few KiB of upper, not 1 GiB."""
    size = 1 << 30
    seen = {}
    for kind in KINDS:
        root = tmp_path / kind
        (lower,), _, _, mnt = layer_dirs(root, 1)
        build_sparse(lower, size)
        with small_tmpfs(root / "small", "8m") as small:
            upper, work = small / "upper", small / "work"
            upper.mkdir()
            work.mkdir()
            with mounted(kind, [lower], upper, work, mnt):
                seen[kind] = outcome(functools.partial(append_byte, mnt / "sparse"))
    assert seen["kernel"] == size + 1
    assert seen["strata"] == seen["kernel"], "a sparse copy-up does not fit an upper the kernel's fits"


# ---- inode numbers -------------------------------------------------------------------------------


def test_inode_numbers_survive_a_remount(tmp_path: Path) -> None:
    names = ["d", "d/lf", "lf", "e", "nf", "nd", "nd/x", "d/lf2"]
    seen: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    for kind, (lowers, upper, work, mnt) in setups(tmp_path, build_lf).items():
        with mounted(kind, lowers, upper, work, mnt):
            (mnt / "nf").write_text("new\n")
            (mnt / "nd").mkdir()
            (mnt / "nd/x").write_text("x\n")
            first = {n: os.stat(mnt / n).st_ino for n in names}
        with mounted(kind, lowers, upper, work, mnt):
            second = {n: os.stat(mnt / n).st_ino for n in reversed(names)}
        seen[kind] = (first, second)
    first, second = seen["kernel"]
    assert first == second and len(set(first.values())) == len(names)
    first, second = seen["strata"]
    assert len(set(first.values())) == len(names)
    assert second == first, "inode numbers changed across a remount"


# ---- . and .. ------------------------------------------------------------------------------------


def test_readdir_lists_dot_and_dotdot(tmp_path: Path) -> None:
    def run(mnt: Path) -> dict[str, tuple[list[str], list[str]]]:
        (mnt / "nd").mkdir()
        (mnt / "d/added").write_text("merged\n")
        (mnt / "nd/x").write_text("x\n")
        out = {}
        for d in ("", "d", "e", "nd"):
            ls = subprocess.run(["ls", "-a1", str(mnt / d)], capture_output=True, text=True, check=True)
            out[d] = (ls.stdout.split("\n")[:-1], sorted(os.listdir(mnt / d)))
        return out

    seen, _ = on_both(tmp_path, build_lf, run)
    k = seen["kernel"]
    assert k["e"] == ([".", ".."], [])
    assert k["d"] == ([".", "..", "added", "lf", "lf2"], ["added", "lf", "lf2"])
    for d, (ls_a, names) in seen["strata"].items():
        assert names == k[d][1], f"listing of /{d} differs"
        assert ls_a == k[d][0], f"`ls -a` of /{d} differs"


# ---- names and devices that look like overlay bookkeeping ----------------------------------------


def test_mknod_whiteout_device_is_refused(tmp_path: Path) -> None:
    def run(mnt: Path) -> list[tuple[str, object]]:
        (mnt / "nd").mkdir()
        dev = stat.S_IFCHR | 0o644
        return [
            ("mknod new dir", outcome(lambda: os.mknod(mnt / "nd/c", dev, os.makedev(0, 0)))),
            ("mknod lower dir", outcome(lambda: os.mknod(mnt / "d/c", dev, os.makedev(0, 0)))),
            ("mknod root", outcome(lambda: os.mknod(mnt / "c", dev, os.makedev(0, 0)))),
            ("mknod over lower", outcome(lambda: os.mknod(mnt / "lf", dev, os.makedev(0, 0)))),
            ("listdir nd", os.listdir(mnt / "nd")),
            ("listdir d", sorted(os.listdir(mnt / "d"))),
            ("lstat", outcome(lambda: os.lstat(mnt / "nd/c") and None)),
            ("unlink", outcome(lambda: os.unlink(mnt / "nd/c"))),
            ("create c", outcome(lambda: (mnt / "nd/c").write_text("c\n") and None)),
            ("rmdir nd", outcome(lambda: os.rmdir(mnt / "nd"))),
            ("unlink c", outcome(lambda: os.unlink(mnt / "nd/c"))),
            ("rmdir nd again", outcome(lambda: os.rmdir(mnt / "nd"))),
        ]

    seen, dirs = on_both(tmp_path, build_lf, run)
    assert seen["kernel"] == [
        ("mknod new dir", "EPERM"), ("mknod lower dir", "EPERM"), ("mknod root", "EPERM"),
        ("mknod over lower", "EEXIST"), ("listdir nd", []), ("listdir d", ["lf", "lf2"]),
        ("lstat", "ENOENT"), ("unlink", "ENOENT"), ("create c", "ok"), ("rmdir nd", "ENOTEMPTY"),
        ("unlink c", "ok"), ("rmdir nd again", "ok")]
    assert seen["strata"] == seen["kernel"], "mknod of a 0/0 device differs from the kernel"
    assert snapshot(dirs["strata"][1], upper_format=True) == snapshot(dirs["kernel"][1], upper_format=True)


def test_wh_names_are_ordinary_files(tmp_path: Path) -> None:
    """A `.wh.x` made through the mount is a file like any other (the kernel lists it and
    it hides nothing), here, through the kernel on strata's upper, and after a remount."""
    def run(mnt: Path) -> tuple[object, ...]:
        (mnt / ".wh.lf").write_text("user data\n")
        (mnt / "d/.wh.lf2").write_text("more\n")
        (mnt / "nd").mkdir()
        (mnt / "nd/.wh..wh..opq").write_text("opq\n")
        return (sorted(os.listdir(mnt)), sorted(os.listdir(mnt / "d")), os.listdir(mnt / "nd"),
                (mnt / ".wh.lf").read_text(), (mnt / "lf").read_bytes(), snapshot(mnt))

    seen, dirs = on_both(tmp_path, build_lf, run)
    k = seen["kernel"]
    assert k[:5] == ([".wh.lf", "d", "e", "lf", "lf2", "nd"], [".wh.lf2", "lf", "lf2"], [".wh..wh..opq"],
                     "user data\n", b"lower\n")
    assert seen["strata"][:5] == k[:5], "a .wh. name made through the mount is not shown as the kernel does"
    assert view(dirs["strata"], "kernel") == k[5], "strata's upper looks different through the kernel"
    assert view(dirs["strata"], "strata") == k[5], "strata's upper looks different after a remount"


# ---- what a lower-directory rename leaves in the upper ------------------------------------------


def build_tree(lower: Path) -> None:
    (lower / "dir/sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c", "sub/d"):
        (lower / "dir" / name).write_text(name + "\n")


def test_renamed_lower_dir_leaves_no_ghosts_for_the_kernel(tmp_path: Path) -> None:
    """strata renames a lower directory (the kernel does with redirect_dir=on); the upper it
    leaves must show the same tree through the kernel, without c????????? entries
    (a whiteout left inside an opaque, pure-upper directory)."""
    def run(mnt: Path) -> tuple[object, list[str], Tree]:
        os.unlink(mnt / "dir/a")
        os.unlink(mnt / "dir/sub/c")
        r = outcome(lambda: os.rename(mnt / "dir", mnt / "dir2"))
        return r, unreadable_entries(mnt), snapshot(mnt)

    seen, dirs = on_both(tmp_path, build_tree, run, extra={"kernel": "redirect_dir=on"})
    k = seen["kernel"]
    assert k[0] == "ok" and k[1] == []
    assert sorted(k[2]) == ["dir2", "dir2/b", "dir2/sub", "dir2/sub/d"]
    assert seen["strata"] == k
    lowers, upper, work, mnt = dirs["strata"]
    shutil.rmtree(work)
    work.mkdir()
    with mounted("kernel", lowers, upper, work, mnt, extra="redirect_dir=on"):
        ghosts = unreadable_entries(mnt)
        assert ghosts == [], f"the kernel shows ghost entries in strata's upper: {ghosts}"
        assert snapshot(mnt) == k[2], "strata's upper looks different through the kernel"


def moved(tree: Tree) -> Tree:
    return {k.replace("big2", "big", 1): v for k, v in tree.items()}


def rename_on_small_upper(kind: str, root: Path, build: Callable[[Path], None]
                          ) -> tuple[object, Tree, Tree, list[str], int]:
    """Rename the lower dir `big` on an upper of 4 MiB: the answer, the view before and
    after, what the upper holds and its free space afterwards."""
    (lower,), _, _, mnt = layer_dirs(root, 1)
    build(lower)
    with small_tmpfs(root / "small", "4m") as small:
        upper, work = small / "upper", small / "work"
        upper.mkdir()
        work.mkdir()
        with mounted(kind, [lower], upper, work, mnt, extra="redirect_dir=on" if kind == "kernel" else ""):
            before = snapshot(mnt)
            r = outcome(lambda: os.rename(mnt / "big", mnt / "big2"))
            after = snapshot(mnt)
        left = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
        free = os.statvfs(small).f_bfree * os.statvfs(small).f_frsize
    return r, before, after, left, free


def test_lower_dir_rename_out_of_space_leaves_nothing(tmp_path: Path) -> None:
    """Renaming a lower directory bigger than the free space of the upper either works
    (a redirect needs no data) or fails and leaves the upper and the view as they were."""
    def build(lower: Path) -> None:
        (lower / "big").mkdir()
        for i in range(6):
            (lower / f"big/f{i}").write_bytes(os.urandom(MiB))

    seen = {kind: rename_on_small_upper(kind, tmp_path / kind, build) for kind in KINDS}
    r, before, after, left, free = seen["kernel"]
    assert r == "ok" and moved(after) == before
    r, before, after, left, free = seen["strata"]
    if r == "ok":
        assert moved(after) == before, "the renamed directory lost content"
    else:
        assert r in ("ENOSPC", "EXDEV"), r
        assert after == before, "a failed rename changed the view"
        assert left == [], f"a failed rename left copies in the upper: {left[:5]}"
        assert free > 3 * MiB, "a failed rename left the upper full"


# ---- SEEK_DATA / SEEK_HOLE and copy_file_range ----------------------------------------------------

def build_sparse_small(lower: Path) -> None:
    with open(lower / "sparse", "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"d" * 4096)
    (lower / "src").write_bytes(bytes(range(256)) * 4096)


def test_seek_data_hole_and_copy_file_range(tmp_path: Path) -> None:
    def run(mnt: Path) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        fd = os.open(mnt / "sparse", os.O_RDONLY)
        try:
            out.append(("SEEK_DATA 0", outcome(lambda: os.lseek(fd, 0, os.SEEK_DATA))))
            out.append(("SEEK_HOLE 1M", outcome(lambda: os.lseek(fd, MiB, os.SEEK_HOLE))))
            out.append(("SEEK_DATA past", outcome(lambda: os.lseek(fd, 3 * MiB, os.SEEK_DATA))))
        finally:
            os.close(fd)
        src = os.open(mnt / "src", os.O_RDONLY)
        dst = os.open(mnt / "dst", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            copied = 0
            while copied < 3 * MiB // 4:
                n = os.copy_file_range(src, dst, 3 * MiB // 4 - copied, copied + 4096, copied)
                if n == 0:
                    break
                copied += n
            out.append(("copy_file_range", copied))
        finally:
            os.close(src)
            os.close(dst)
        want = (bytes(range(256)) * 4096)[4096:4096 + 3 * MiB // 4]
        out.append(("copied bytes", (mnt / "dst").read_bytes() == want))
        return out

    seen, _ = on_both(tmp_path, build_sparse_small, run)
    assert seen["kernel"] == [("SEEK_DATA 0", MiB), ("SEEK_HOLE 1M", MiB + 4096), ("SEEK_DATA past", "ENXIO"),
                              ("copy_file_range", 3 * MiB // 4), ("copied bytes", True)]
    assert seen["strata"] == seen["kernel"], "SEEK_DATA/SEEK_HOLE or copy_file_range differ"
