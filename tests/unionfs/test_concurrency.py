"""strata-unionfs answers other requests while long work runs, and keeps
requests on the node that work changes in order.

"During a copy-up" is observed from the host, not timed: the copy is a
`#strata-*` file in the work directory from its creation to its rename into
the upper, so a request answered between two sightings of the same temp
file was answered while the copy-up was in flight.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .support import layer_dirs, mounted

BIG_MIB = 256


def _big_lower(lower: Path) -> bytes:
    """A lower file big enough that its copy-up takes many requests' time."""
    block = os.urandom(1 << 20)
    with open(lower / "big", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(block)
    (lower / "small").write_text("small\n")
    return hashlib.sha256(block * BIG_MIB).digest()


def _copy_in_flight(work: Path) -> tuple[int, int] | None:
    """The identity of the copy being built in the work directory, if one is."""
    for entry in os.scandir(work / "work"):
        if entry.name.startswith("#strata-") and entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            return st.st_dev, st.st_ino
    return None


def _during_copy_up(work: Path, action: Callable[[], None], start: Callable[[], None]) -> int:
    """Run `start` (which triggers a copy-up) in a thread and `action` repeatedly
    until it is done; returns how many runs of `action` began and ended while the
    same copy was in flight."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start()
        except BaseException as e:  # reported by the test
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=run)
    t.start()
    inside = 0
    try:
        while not done.is_set():
            before = _copy_in_flight(work)
            action()
            if before is not None and _copy_in_flight(work) == before:
                inside += 1
    finally:
        t.join()
    assert not errors, errors
    return inside


def test_other_requests_are_answered_during_a_copy_up(tmp_path: Path) -> None:
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    digest = _big_lower(lowers[0])
    names = iter(range(1 << 30))

    def lookup_and_read() -> None:
        assert not (mnt / f"missing-{next(names)}").exists()  # a new name: the daemon answers
        assert (mnt / "small").read_text() == "small\n"

    def append() -> None:
        with open(mnt / "big", "ab") as f:
            f.write(b"A")

    with mounted("strata", lowers, upper, work, mnt):
        inside = _during_copy_up(work, lookup_and_read, append)
        assert inside > 0, "no request was answered while the copy-up ran"
        with open(mnt / "big", "rb") as f:
            data = f.read()
    assert hashlib.sha256(data[:-1]).digest() == digest and data[-1:] == b"A"
    assert os.path.getsize(lowers[0] / "big") == BIG_MIB << 20
    assert _copy_in_flight(work) is None


def test_requests_on_the_file_being_copied_wait_for_it(tmp_path: Path) -> None:
    """A second writer, a rename and a stat of the file being copied up all see
    the finished copy: nothing is lost, torn or written to the lower."""
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    digest = _big_lower(lowers[0])
    seen: list[str] = []

    def second_writer_then_rename() -> None:
        if seen or _copy_in_flight(work) is None:
            return
        with open(mnt / "big", "ab") as f:  # waits for the copy-up, then opens the copy
            f.write(b"B")
        os.rename(mnt / "big", mnt / "moved")
        seen.append("done")

    def append() -> None:
        with open(mnt / "big", "ab") as f:
            f.write(b"A")

    with mounted("strata", lowers, upper, work, mnt):
        _during_copy_up(work, second_writer_then_rename, append)
        assert seen, "the copy-up finished before a second request could meet it"
        assert not (mnt / "big").exists()
        with open(mnt / "moved", "rb") as f:
            data = f.read()
    assert hashlib.sha256(data[:-2]).digest() == digest
    assert sorted(data[-2:]) == sorted(b"AB")
    assert os.path.getsize(lowers[0] / "big") == BIG_MIB << 20
    assert sorted(os.listdir(upper)) == ["big", "moved"]  # "big": the whiteout


def test_cold_reads_return_the_lower_data(tmp_path: Path) -> None:
    """Reads of data not in the page cache, partly in it, and reads that end at
    the end of the file return exactly the file."""
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    data = os.urandom((3 << 20) + 123)
    (lowers[0] / "f").write_bytes(data)
    fd = os.open(lowers[0] / "f", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(fd, 4096, 1 << 20)  # one page cached in the middle
    finally:
        os.close(fd)
    with mounted("strata", lowers, upper, work, mnt):
        assert (mnt / "f").read_bytes() == data
        with open(mnt / "f", "rb", buffering=0) as f:
            assert f.read(1000) == data[:1000]
            f.seek(len(data) - 10)
            assert f.read(100) == data[-10:]
            assert f.read(100) == b""


def test_renaming_a_lower_directory_copies_its_files_off_the_loop(tmp_path: Path) -> None:
    """(Looked up elsewhere than the renamed directory's parent, which the kernel
    keeps locked for the whole rename.)"""
    lowers, upper, work, mnt = layer_dirs(tmp_path, 1)
    (lowers[0] / "d" / "sub").mkdir(parents=True)
    (lowers[0] / "other").mkdir()
    digest = _big_lower(lowers[0] / "d" / "sub")
    names = iter(range(1 << 30))

    def lookup() -> None:
        assert not (mnt / "other" / f"missing-{next(names)}").exists()

    with mounted("strata", lowers, upper, work, mnt):
        assert (mnt / "other").is_dir()  # its entry cached: reaching it needs no lock on the parent
        inside = _during_copy_up(work, lookup, lambda: os.rename(mnt / "d", mnt / "e"))
        assert inside > 0, "no request was answered while the directory's files were copied up"
        assert not (mnt / "d").exists()
        with open(mnt / "e" / "sub" / "big", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == digest
        assert (mnt / "e" / "sub" / "small").read_text() == "small\n"
    assert os.path.getsize(upper / "e" / "sub" / "big") == BIG_MIB << 20
    assert _copy_in_flight(work) is None
