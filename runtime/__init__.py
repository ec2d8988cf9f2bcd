"""The strata container runtime and the `strata` command line.

`containers.Runtime` is the entry point (create, start, exec, stop, kill, remove, wait,
pause, diff, commit, export, top, prune) over records in `<state root>/containers`;
it builds on `rootfs` (the container's tree and pivot_root), `namespaces` (unshare,
setns, pivot_root by ctypes), `process` (starting processes in namespaces, logs,
attaching), `cgroups` (v1 and v2 behind one interface), `network` (pyroute2 bridge,
veths, published ports), `mounts` (volumes from the volume manager, plugins or host
paths), and the confinement: `capabilities`, `devices` (the device allow-list, a BPF
device program on cgroup v2) and `seccomp` (docker's default profile via libseccomp).
The `cmd_*` modules are the thin CLI over them and the image store."""
