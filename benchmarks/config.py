"""How big a benchmark run is: the full set the issue asks for, the quick set
`make bench` runs in a few minutes, and whatever a caller scales between."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    """Every size a run depends on, so a result file says exactly what was measured."""

    name: str
    tree_files: int  # files in the tree the metadata and tar rows walk
    tree_dirs: int  # leaf directories holding them
    big_mib: int  # the file dd, fio and copy-up use
    create_files: int  # 4 KiB files the create + write row makes
    rm_files: int  # files in the lower directory rm -rf removes
    fio_reads: int  # 4 KiB random reads per fio sample
    scaling_files: int  # files spread over the lower layers in the scaling rows
    stall_mib: int  # the lower file whose copy-up the stall rows watch another reader through
    small_files: int = 2000  # 2 KiB files the small-file tar row reads
    layer_counts: tuple[int, ...] = (1, 8, 32, 128)
    reps: int = 5
    timeout: float = 900.0  # seconds one sample may take before it is abandoned
    note: str = field(default="", compare=False)


FULL = Config(
    name="full",
    tree_files=20_000,
    tree_dirs=200,
    big_mib=256,
    create_files=5000,
    rm_files=1000,
    fio_reads=65_536,
    scaling_files=10_000,
    stall_mib=1024,
    reps=5,
)

QUICK = Config(
    name="quick",
    tree_files=2000,
    tree_dirs=40,
    big_mib=64,
    create_files=1000,
    rm_files=200,
    fio_reads=4096,
    scaling_files=500,
    stall_mib=256,
    reps=3,
    timeout=120.0,
    note="quick set (`make bench`): smaller tree and files, fewer repetitions; "
    "`make bench FULL=1` runs the full set",
)
