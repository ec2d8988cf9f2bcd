"""The private Docker Engine the suites share is `benchmarks.dockerd` (run_latency
needs it too, and benchmarks never import tests); its names stay importable from
here for the suites that still do."""

from benchmarks.dockerd import busybox_rootfs_tar, running_dockerd

__all__ = ["busybox_rootfs_tar", "running_dockerd"]
