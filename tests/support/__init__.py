"""Helpers shared by several test packages: a private Docker Engine
(`dockerd.running_dockerd`) and a busybox image rootfs to import into it
(`dockerd.busybox_rootfs_tar`), both re-exported from `benchmarks.dockerd`."""
