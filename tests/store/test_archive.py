"""Layer tars: OCI change-set rules into the overlay format, the hostile-tar corpus,
and produce → re-apply round trips checked against kernel overlayfs."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.store.helpers import TarBuilder, overlay, snapshot
from unionfs.archive import OPAQUE_XATTR, apply_layer, produce_layer
from unionfs.errors import StrataError


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
