"""The lower layers every system mounts, built once per run: a tree of small
files split over two layers (with some files shadowed by the upper one), a big
file, a directory to delete, and trees spread over 1..128 layers. The same
merged view is also written as a plain directory, the no-union baseline."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config

# Cycled through per directory; mean 44.7 KiB, which gives the design's
# 887 MiB over 20,000 files.
FILE_SIZES = (0, 100, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 327680)
SHADOW_EVERY = 20  # every 20th bottom-layer file also has a newer copy in the top layer
SCALING_DIRS = 10

TREE = "tree"
BIG = "big.bin"
RMDIR = "rmme"
STALL = "stall.bin"
SMALL = "small"
SMALL_SIZE = 2048


@dataclass(frozen=True)
class Stack:
    """A union to mount: lower layers top first, and the same merged tree as a plain directory."""

    lowers: tuple[Path, ...]
    plain: Path


@dataclass(frozen=True)
class Dataset:
    main: Stack
    tree_paths: tuple[str, ...]  # every entry under TREE, relative to the mount
    tree_bytes: int
    scaling: dict[int, Stack]
    scaling_paths: tuple[str, ...]


class _Writer:
    """Writes file contents sliced from one random buffer (cheap, and not compressible)."""

    def __init__(self) -> None:
        self.buf = random.Random(6).randbytes(max(FILE_SIZES) + 1)

    def write(self, path: Path, size: int, variant: int = 0) -> None:
        with open(path, "wb") as f:
            f.write(self.buf[variant : variant + size])


def build(root: Path, cfg: Config, log: Callable[[str], None]) -> Dataset:
    """Create every layer under root (which must be empty)."""
    w = _Writer()
    bottom, top, plain = root / "m" / "0", root / "m" / "1", root / "m" / "plain"
    log(f"building a {cfg.tree_files}-file tree in 2 lower layers and a {cfg.big_mib} MiB file")
    dirs = [f"{TREE}/d{i // 10:03d}/s{i % 10}" for i in range(cfg.tree_dirs)]
    paths: list[str] = [TREE, *sorted({d.rsplit("/", 1)[0] for d in dirs}), *dirs]
    for base in (bottom, top, plain):
        for d in dirs:
            (base / d).mkdir(parents=True)
    total = 0
    for k in range(cfg.tree_files):
        rel = f"{dirs[k % cfg.tree_dirs]}/f{k:05d}"
        size = FILE_SIZES[(k // cfg.tree_dirs) % len(FILE_SIZES)]
        paths.append(rel)
        total += size
        if k % 2:
            w.write(top / rel, size)
            w.write(plain / rel, size)
            continue
        w.write(bottom / rel, size)
        shadowed = k % SHADOW_EVERY == 0
        if shadowed:
            w.write(top / rel, size, variant=1)
        w.write(plain / rel, size, variant=1 if shadowed else 0)
    log(f"building a {cfg.stall_mib} MiB file and {cfg.small_files} files of {SMALL_SIZE} bytes")
    for base in (bottom, plain):
        _write_big(base / BIG, cfg.big_mib, w)
        _write_big(base / STALL, cfg.stall_mib, w)
        (base / RMDIR).mkdir()
        for k in range(cfg.rm_files):
            w.write(base / RMDIR / f"f{k:04d}", 4096)
        (base / SMALL).mkdir()
        for k in range(cfg.small_files):
            w.write(base / SMALL / f"f{k:05d}", SMALL_SIZE, variant=k % 64)

    log(f"building {'/'.join(map(str, cfg.layer_counts))} lower layers over {cfg.scaling_files} files")
    scaling: dict[int, Stack] = {}
    splain = root / "s" / "plain"
    names = [f"d{k % SCALING_DIRS:02d}/f{k:05d}" for k in range(cfg.scaling_files)]
    for n in cfg.layer_counts:
        layers = [root / "s" / f"{n}" / f"{i}" for i in range(n)]  # index 0 = bottom
        for layer in layers:
            for j in range(SCALING_DIRS):
                (layer / f"d{j:02d}").mkdir(parents=True)
        for k, name in enumerate(names):
            (layers[k % n] / name).touch()
        scaling[n] = Stack(tuple(reversed(layers)), splain)
    for j in range(SCALING_DIRS):
        (splain / f"d{j:02d}").mkdir(parents=True)
    for name in names:
        (splain / name).touch()
    scaling_paths = (*[f"d{j:02d}" for j in range(SCALING_DIRS)], *names)
    os.sync()
    return Dataset(Stack((top, bottom), plain), tuple(paths), total, scaling, scaling_paths)


def _write_big(path: Path, mib: int, w: _Writer) -> None:
    chunk = (w.buf * 4)[: 1 << 20]
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
