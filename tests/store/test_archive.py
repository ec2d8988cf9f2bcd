"""Layer tars: OCI change-set rules into the overlay format, the hostile-tar corpus,
and produce → re-apply round trips checked against kernel overlayfs."""

from __future__ import annotations

import gzip
import io
import os
import random
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from common.errors import StrataError
from images.archive import apply_layer
from images.produce import produce_layer
from tests.store.helpers import TarBuilder, overlay, snapshot
from tests.unionfs.support import mounted
from unionfs.whiteout import OPAQUE_XATTR


def apply_bytes(data: bytes, dest: Path, **kw: object) -> object:
    return apply_layer(io.BytesIO(data), dest, **kw)  # type: ignore[arg-type]


def is_whiteout(p: Path) -> bool:
    st = os.lstat(p)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# --- change-set rules -----------------------------------------------------------------


def test_opaque_marker_applies_before_siblings_wherever_it_sits(tmp_path: Path) -> None:
    tar = TarBuilder().dir("d").file("d/a").file("d/.wh..wh..opq", b"").file("d/b").bytes()
    apply_bytes(tar, tmp_path / "l")
    d = tmp_path / "l" / "d"
    assert sorted(os.listdir(d)) == ["a", "b"]
    assert os.getxattr(d, OPAQUE_XATTR) == b"y"


def test_whiteouts_become_char_devices_and_dir_over_whiteout_is_opaque(tmp_path: Path) -> None:
    tar = (
        TarBuilder().file(".wh.gone", b"").dir("x").file("x/.wh.sub", b"").file(".wh.again", b"")
        .dir("again").file("again/kept").bytes()
    )
    apply_bytes(tar, tmp_path / "l")
    root = tmp_path / "l"
    assert is_whiteout(root / "gone") and is_whiteout(root / "x" / "sub")
    assert not os.path.lexists(root / ".wh.gone")
    assert (root / "again").is_dir() and os.getxattr(root / "again", OPAQUE_XATTR) == b"y"
    assert (root / "again" / "kept").exists()


def test_dir_over_dir_keeps_children_anything_else_replaces(tmp_path: Path) -> None:
    tar = (
        TarBuilder().dir("d", mode=0o700).file("d/child").dir("d", mode=0o751)
        .dir("r").file("r/x").file("r", b"now a file").file("s", b"old").symlink("s", "elsewhere")
        .dir("o").file("o/.wh..wh..opq", b"").file("o", b"opaque dir replaced").bytes()
    )
    apply_bytes(tar, tmp_path / "l")
    root = tmp_path / "l"
    assert (root / "d" / "child").exists()
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0o751
    assert (root / "r").read_bytes() == b"now a file"
    assert os.readlink(root / "s") == "elsewhere"
    assert (root / "o").read_bytes() == b"opaque dir replaced"


def test_metadata_links_devices_xattrs_kept(tmp_path: Path) -> None:
    b = TarBuilder().dir("bin", mtime=1_500_000_000).file("bin/su", b"#!", mode=0o4755, uid=0, gid=0)
    b.file("data", b"owned", uid=1234, gid=5678, mode=0o640, mtime=1_234_567_890)
    b.hardlink("data-link", "data").symlink("sl", "/abs/target").chardev("null", 1, 3)
    b._add("fifo", b"6")
    cap = b"\x01\x00\x00\x02\x00\x04\x00\x00" + b"\x00" * 12  # v2, cap_net_bind_service permitted
    info_x = {"SCHILY.xattr.user.test": "hello", "SCHILY.xattr.security.capability": cap.decode("latin-1")}
    b.file("xa", b"x", pax_headers=info_x)
    apply_bytes(b.bytes(), tmp_path / "l")
    root = tmp_path / "l"
    st = os.lstat(root / "bin" / "su")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    st = os.lstat(root / "data")
    meta = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), int(st.st_mtime))
    assert meta == (1234, 5678, 0o640, 1_234_567_890)
    assert st.st_nlink == 2 and os.lstat(root / "data-link").st_ino == st.st_ino
    assert os.readlink(root / "sl") == "/abs/target"
    assert os.lstat(root / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(root / "fifo").st_mode)
    assert os.getxattr(root / "xa", "user.test") == b"hello"
    assert os.getxattr(root / "xa", "security.capability") == cap
    assert int(os.lstat(root / "bin").st_mtime) == 1_500_000_000


def test_gzip_zstd_and_plain_give_one_diff_id(tmp_path: Path) -> None:
    tar = TarBuilder().dir("a").file("a/f", b"payload" * 1000).bytes()
    forms = {"": tar, "gzip": gzip.compress(tar), "zstd": zstandard.ZstdCompressor().compress(tar)}
    results = {}
    for name, data in forms.items():
        blob = io.BytesIO()
        results[name] = apply_bytes(data, tmp_path / f"l-{name or 'plain'}", blob_out=blob)
        assert results[name].compression == name  # type: ignore[attr-defined]
        kept = blob.getvalue()
        assert (gzip.decompress(kept) if name != "zstd" else zstandard.ZstdDecompressor().decompressobj()
                .decompress(kept)) == tar
    assert len({r.diff_id for r in results.values()}) == 1  # type: ignore[attr-defined]
    assert results["gzip"].source_digest != results[""].source_digest  # type: ignore[attr-defined]


def test_digest_mismatch_refused_and_nothing_left(tmp_path: Path) -> None:
    tar = TarBuilder().file("f").bytes()
    with pytest.raises(StrataError, match="digest mismatch"):
        apply_bytes(tar, tmp_path / "l", expected_diff_id="sha256:" + "0" * 64)
    with pytest.raises(StrataError, match="digest mismatch"):
        apply_bytes(gzip.compress(tar), tmp_path / "l", expected_digest="sha256:" + "1" * 64)
    assert os.listdir(tmp_path) == []


# --- the hostile corpus ---------------------------------------------------------------

BAD_TAR = "not a valid layer tar"
OUTSIDE = "outside"  # sibling of the layer dir, holds a secret no tar may touch


def _corpus(outside: Path) -> dict[str, tuple[Callable[[], bytes], str, dict[str, object]]]:
    o = str(outside)
    return {
        "dotdot": (lambda: TarBuilder().file("../outside/pwned").bytes(), r"'\.\.'", {}),
        "dotdot-nested": (lambda: TarBuilder().dir("a").file("a/../../outside/pwned").bytes(), r"'\.\.'", {}),
        "absolute": (lambda: TarBuilder().file(f"{o}/pwned").bytes(), "absolute path", {}),
        "symlink-then-write-abs": (
            lambda: TarBuilder().symlink("lnk", o).file("lnk/pwned").bytes(), "symlink", {}),
        "symlink-then-write-rel": (
            lambda: TarBuilder().symlink("lnk", "../outside").file("lnk/secret", b"overwritten").bytes(),
            "symlink", {}),
        "symlink-then-mkdir": (
            lambda: TarBuilder().symlink("lnk", o).dir("lnk/sub").bytes(), "symlink", {}),
        "symlink-then-whiteout": (
            lambda: TarBuilder().symlink("lnk", o).file("lnk/.wh.secret", b"").bytes(), "symlink", {}),
        "symlink-then-opaque": (
            lambda: TarBuilder().symlink("lnk", o).file("lnk/.wh..wh..opq", b"").bytes(), "symlink", {}),
        "hardlink-absolute": (
            lambda: TarBuilder().hardlink("h", f"{o}/secret").bytes(), "absolute path", {}),
        "hardlink-dotdot": (
            lambda: TarBuilder().hardlink("h", "../outside/secret").bytes(), r"'\.\.'", {}),
        "hardlink-through-symlink": (
            lambda: TarBuilder().symlink("s", o).hardlink("h", "s/secret").bytes(), "symlink", {}),
        "hardlink-named-through-symlink": (
            lambda: TarBuilder().file("f").symlink("s", o).hardlink("s/pwned", "f").bytes(), "symlink", {}),
        "whiteout-of-dotdot": (lambda: TarBuilder().file("a/.wh...", b"").bytes(), "bad whiteout", {}),
        "hardlink-to-missing": (lambda: TarBuilder().hardlink("h", "nope").bytes(), "not in this layer", {}),
        "entry-over-file": (lambda: TarBuilder().file("f").file("f/x").bytes(), "non-directory", {}),
        "device-not-allowed": (
            lambda: TarBuilder().chardev("mem", 1, 1).bytes(), "device node", {"allow_devices": False}),
        "overlay-xattr": (
            lambda: TarBuilder().dir("d", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}).bytes(),
            "overlay-private xattr", {}),
        "not-a-tar": (lambda: b"this is not a tar archive at all" * 40, BAD_TAR, {}),
        "truncated": (lambda: TarBuilder().file("big", b"z" * 100_000).bytes()[:5000], BAD_TAR, {}),
        "bad-gzip": (lambda: gzip.compress(TarBuilder().file("f").bytes())[:-30], BAD_TAR, {}),
    }


@pytest.mark.parametrize("case", sorted(_corpus(Path("/x"))))
def test_hostile_tar_refused_leaving_nothing(tmp_path: Path, case: str) -> None:
    outside = tmp_path / OUTSIDE
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    build, message, kw = _corpus(outside)[case]
    parent = tmp_path / "layers"
    parent.mkdir()
    with pytest.raises(StrataError, match=message):
        apply_bytes(build(), parent / "l", **kw)
    assert os.listdir(parent) == []
    assert os.listdir(outside) == ["secret"] and (outside / "secret").read_bytes() == b"secret"


def test_devices_allowed_by_default_but_whiteouts_always(tmp_path: Path) -> None:
    apply_bytes(TarBuilder().file(".wh.x", b"").bytes(), tmp_path / "l", allow_devices=False)
    assert is_whiteout(tmp_path / "l" / "x")


# --- produce and re-apply, against kernel overlayfs ------------------------------------


def _base_layer() -> bytes:
    b = TarBuilder().dir("etc").file("etc/passwd", b"root:x:0:0\n").file("etc/hosts", b"127.0.0.1\n")
    b.dir("gone-dir").file("gone-dir/a").dir("gone-dir/sub").file("gone-dir/sub/b")
    b.dir("replaced").file("replaced/old1").file("replaced/old2")
    b.dir("keep").file("keep/big", os.urandom(300_000))
    b.file("keep/linked", b"L").hardlink("keep/linked2", "keep/linked").symlink("keep/sl", "big")
    b.file("tobedir", b"f").dir("tobefile").file("tobefile/x").file("chmodme", b"c", mode=0o600)
    return b.bytes()


def _mutate(m: Path) -> None:
    """Changes made through a kernel overlay mount: the kernel writes the upper."""
    (m / "etc" / "hosts").write_bytes(b"127.0.0.1 changed\n")
    (m / "etc" / "passwd").unlink()
    subprocess.run(["rm", "-rf", str(m / "gone-dir")], check=True)
    subprocess.run(["rm", "-rf", str(m / "replaced")], check=True)
    (m / "replaced").mkdir(mode=0o750)
    (m / "replaced" / "new").write_bytes(b"new")
    with open(m / "keep" / "big", "ab") as f:
        f.write(b"appended")
    os.unlink(m / "tobedir")
    (m / "tobedir").mkdir()
    (m / "tobedir" / "inner").write_bytes(b"i")
    subprocess.run(["rm", "-rf", str(m / "tobefile")], check=True)
    (m / "tobefile").write_bytes(b"now a file")
    os.chmod(m / "chmodme", 0o4755)
    os.chown(m / "chmodme", 99, 98)
    (m / "fresh").mkdir()
    (m / "fresh" / "one").write_bytes(b"1")
    os.link(m / "fresh" / "one", m / "fresh" / "two")
    os.symlink("../etc/hosts", m / "fresh" / "link")
    os.mkfifo(m / "fresh" / "fifo")
    os.mknod(m / "fresh" / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.setxattr(m / "fresh" / "one", "user.note", b"\xff\x00binary")
    os.utime(m / "fresh" / "one", (1_400_000_000, 1_400_000_000))
    os.rename(m / "keep" / "sl", m / "keep" / "sl-renamed")


def test_produce_then_reapply_equals_kernel_merged_view(tmp_path: Path) -> None:
    base = tmp_path / "base"
    apply_bytes(_base_layer(), base)
    upper, work = tmp_path / "upper", tmp_path / "work"
    with overlay(tmp_path / "m1", [base], upper, work) as m:
        _mutate(m)
    with overlay(tmp_path / "m1", [base], upper, work) as m:
        reference = snapshot(m)
    assert "etc/passwd" not in reference and "gone-dir" not in reference
    assert "replaced/old1" not in reference and "replaced/new" in reference

    out = io.BytesIO()
    diff_id = produce_layer(upper, out)
    again = io.BytesIO()
    assert produce_layer(upper, again) == diff_id and again.getvalue() == out.getvalue()

    applied = apply_layer(io.BytesIO(out.getvalue()), tmp_path / "layer2")
    assert applied.diff_id == diff_id
    with overlay(tmp_path / "m2", [tmp_path / "layer2", base]) as m:
        assert snapshot(m) == reference


def test_produce_reads_oci_markers_in_upper(tmp_path: Path) -> None:
    """fuse-overlayfs / containers-storage uppers may carry .wh. files and user.* opaque xattrs."""
    upper = tmp_path / "u"
    (upper / "d").mkdir(parents=True)
    os.setxattr(upper / "d", "user.fuseoverlayfs.opaque", b"y")
    (upper / ".wh.x").write_bytes(b"")
    out = io.BytesIO()
    produce_layer(upper, out)
    apply_layer(io.BytesIO(out.getvalue()), tmp_path / "l")
    assert os.getxattr(tmp_path / "l" / "d", OPAQUE_XATTR) == b"y"
    assert is_whiteout(tmp_path / "l" / "x")


def test_renamed_lower_dirs_redirect_dir_on(tmp_path: Path) -> None:
    """The kernel with redirect_dir=on renames lower dirs by a redirect xattr; the layer
    must carry the renamed dir's whole content (read through the lowers)."""
    b = TarBuilder().dir("a").file("a/keep", b"k").file("a/drop", b"d").dir("a/sub").file("a/sub/deep", b"x")
    b.dir("a/sub/inner").file("a/sub/inner/f", b"f").dir("other").file("other/o", b"o")
    lower_top = TarBuilder().dir("a").file("a/from-top", b"t").file("a/sub/.wh.gone", b"").bytes()
    apply_bytes(b.file("a/sub/gone", b"g").bytes(), tmp_path / "base")
    apply_bytes(lower_top, tmp_path / "top")
    lowers = [tmp_path / "top", tmp_path / "base"]
    upper, work = tmp_path / "upper", tmp_path / "work"
    with overlay(tmp_path / "m", lowers, upper, work, "redirect_dir=on") as m:
        os.rename(m / "a", m / "renamed")  # relative redirect
        (m / "renamed" / "added").write_bytes(b"+")
        os.unlink(m / "renamed" / "drop")
        (m / "x").mkdir()
        os.rename(m / "renamed" / "sub", m / "x" / "moved")  # absolute redirect
        os.rename(m / "other", m / "x" / "other2")
        reference = snapshot(m)
    assert "renamed/sub" not in reference and "x/moved/inner/f" in reference
    assert "x/moved/gone" not in reference and "renamed/from-top" in reference
    assert any(n.startswith("trusted.overlay.redirect") for n in os.listxattr(upper / "renamed"))

    with pytest.raises(StrataError, match="renamed lower dir"):
        produce_layer(upper, io.BytesIO())
    out = io.BytesIO()
    produce_layer(upper, out, lowers)
    apply_layer(io.BytesIO(out.getvalue()), tmp_path / "layer")
    with overlay(tmp_path / "m2", [tmp_path / "layer", *lowers]) as m:
        assert snapshot(m) == reference


def test_layer_root_is_0755_and_zero_runs_become_holes(tmp_path: Path) -> None:
    data = bytearray(8 << 20)
    data[5_000_000:5_000_005] = b"hello"
    apply_bytes(TarBuilder().file("var/log/lastlog", bytes(data)).file("tail", b"x" + bytes(100_000)).bytes(),
                tmp_path / "l")
    assert stat.S_IMODE(os.lstat(tmp_path / "l").st_mode) == 0o755
    f = tmp_path / "l" / "var" / "log" / "lastlog"
    assert f.read_bytes() == data and os.lstat(f).st_blocks * 512 < (1 << 20)
    assert (tmp_path / "l" / "tail").read_bytes() == b"x" + bytes(100_000)


def _random_tar(rng: random.Random, outside: Path) -> bytes:
    """Entries drawn from a small name space so they collide: files, dirs, symlinks to inside,
    outside and `..` targets, hard links, whiteouts and opaque markers, some through others."""
    names = ["a", "b", "a/b", "a/c", "b/a", "a/b/c", "l", "l/x", "a/l", "a/l/y", ".wh.a", "a/.wh..wh..opq",
             ".wh.l", "a/.wh.b"]
    targets = [str(outside), "../outside", "../../outside/secret", "a", "/etc", "..", "a/b", "."]
    b = TarBuilder()
    for _ in range(rng.randint(1, 8)):
        name = rng.choice(names)
        kind = rng.randrange(5)
        if kind == 0:
            b.file(name, rng.choice([b"", b"data", b"pwned"]))
        elif kind == 1:
            b.dir(name)
        elif kind == 2:
            b.symlink(name, rng.choice(targets))
        elif kind == 3:
            b.hardlink(name, rng.choice(names + targets))
        else:
            b.file(name + "/inner", b"deep")
    return b.bytes()


def test_random_tars_never_write_outside_and_failures_leave_nothing(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    before = snapshot(tmp_path / "outside")
    parent = tmp_path / "layers"
    parent.mkdir()
    rng = random.Random(1234)
    refused = 0
    for i in range(400):
        dest = parent / f"l{i}"
        try:
            apply_bytes(_random_tar(rng, outside), dest)
        except StrataError:
            refused += 1
            assert not dest.exists()
        else:
            for dirpath, _dirs, files in os.walk(dest):  # everything applied stays in dest
                for f in files:
                    assert os.path.realpath(os.path.join(dirpath, f)).startswith(str(dest)) or \
                        os.path.islink(os.path.join(dirpath, f))
        assert snapshot(outside) == before
        assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) == []
    assert 50 < refused < 390  # the corpus exercises both paths


def _random_changes(rng: random.Random, m: Path) -> None:
    """Random edits through a kernel overlay mount over a small tree (directory renames
    included: the kernel writes redirects)."""
    for _ in range(rng.randint(1, 12)):
        entries = sorted(str(p.relative_to(m)) for p in m.rglob("*"))
        target = m / rng.choice(entries) if entries else m / "x"
        op = rng.randrange(9)
        try:
            if op == 0 and target.exists() and target.is_dir() and not target.is_symlink():
                subprocess.run(["rm", "-rf", str(target)], check=True)
                if rng.random() < 0.5:
                    target.mkdir()
                    (target / "again").write_bytes(b"re")
            elif op == 1 and (target.is_file() or target.is_symlink()):
                target.unlink()
            elif op == 2 and target.is_file():
                with open(target, "ab") as f:
                    f.write(b"+")
            elif op == 3:
                parent = target if target.is_dir() and not target.is_symlink() else target.parent
                (parent / f"new{rng.randrange(100)}").write_bytes(b"n")
            elif op == 4 and target.is_file():
                os.rename(target, target.with_name(target.name + ".moved"))
            elif op == 5 and target.exists() and not target.is_symlink():
                os.chmod(target, rng.choice([0o700, 0o644, 0o4755]))
            elif op == 6 and target.is_file() and not target.is_symlink():
                os.link(target, target.with_name(target.name + ".link"))
            elif op == 7:
                parent = target if target.is_dir() and not target.is_symlink() else target.parent
                (parent / f"sub{rng.randrange(100)}").mkdir(exist_ok=True)
            elif op == 8 and target.is_dir() and not target.is_symlink():
                dirs = [m, *(p for p in m.rglob("*") if p.is_dir() and not p.is_symlink())]
                into = rng.choice([d for d in dirs if target not in (d, *d.parents)])
                os.rename(target, into / f"{target.name}-r{rng.randrange(100)}")
        except FileExistsError:
            pass


def test_random_changes_round_trip_through_a_layer(tmp_path: Path) -> None:
    rng = random.Random(99)
    b = TarBuilder()
    for d in ("d1", "d1/d2", "d3"):
        b.dir(d)
    for f in ("f1", "d1/f2", "d1/d2/f3", "d3/f4", "d3/f5"):
        b.file(f, f.encode())
    b.symlink("d1/sl", "f2").hardlink("d3/hl", "d3/f4")
    apply_bytes(b.bytes(), tmp_path / "base")
    for i in range(25):
        upper, work = tmp_path / f"u{i}", tmp_path / f"w{i}"
        with overlay(tmp_path / "m", [tmp_path / "base"], upper, work, "redirect_dir=on") as m:
            _random_changes(rng, m)
            reference = snapshot(m)
        out = io.BytesIO()
        produce_layer(upper, out, [tmp_path / "base"])
        apply_layer(io.BytesIO(out.getvalue()), tmp_path / f"layer{i}")
        with overlay(tmp_path / "m", [tmp_path / f"layer{i}", tmp_path / "base"]) as m:
            # Link counts aside: inside a renamed dir the kernel shows a lower file's own count,
            # still 2 when its hard-link partner is deleted or changed; the layer holds a copy.
            assert _no_nlink(snapshot(m)) == _no_nlink(reference), f"round {i}"


def _no_nlink(tree: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {k: v[:-1] for k, v in tree.items()}


def test_random_changes_through_strata_unionfs_commit_to_the_same_tree(tmp_path: Path) -> None:
    """What the runtime commits: an upper written by strata-unionfs, made a layer, read back."""
    rng = random.Random(7)
    b = TarBuilder()
    for d in ("d1", "d1/d2", "d3"):
        b.dir(d)
    for f in ("f1", "d1/f2", "d1/d2/f3", "d3/f4", "d3/f5"):
        b.file(f, f.encode())
    b.symlink("d1/sl", "f2").hardlink("d3/hl", "d3/f4")
    apply_bytes(b.bytes(), tmp_path / "base")
    for i in range(8):
        upper, work = tmp_path / f"u{i}", tmp_path / f"w{i}"
        upper.mkdir()
        work.mkdir()
        with mounted("strata", [tmp_path / "base"], upper, work, tmp_path / "m") as m:
            _random_changes(rng, m)
        # The reference is the upper as the kernel reads it: what a commit captures.
        with overlay(tmp_path / "k", [tmp_path / "base"], upper, tmp_path / f"kw{i}") as k:
            reference = _no_nlink(snapshot(k))
        out = io.BytesIO()
        produce_layer(upper, out, [tmp_path / "base"])
        apply_layer(io.BytesIO(out.getvalue()), tmp_path / f"layer{i}")
        with overlay(tmp_path / "m2", [tmp_path / f"layer{i}", tmp_path / "base"]) as m:
            assert _no_nlink(snapshot(m)) == reference, f"round {i}"
