"""The strata container runtime and the `strata` command line.

A container is a typed record (`record`: config, host config, state, layers, a
status with guards) in `<state root>/containers`, found through `containers`
(the state root's Runtime and a Container's live view). The verbs, one group per
module as youki's container/ does them: `create`, `monitor` (start and the monitor,
a daemon through common.daemon), `execute` (exec), `stop` (kill, stop, wait),
`pause`, `remove` (rm), `layer` (diff, commit, export), `inspection` (inspect, top),
`prune`. What they share: `prepare` (the rootfs through unionfs.client, volumes,
cgroup, veth), `etc_files`, `teardown` (undoing a run), `confine` (a process's
capabilities, seccomp and devices), `attach` (spawn-and-attach for the first
process and exec, logs).

Below them: `rootfs` (the container's tree and pivot_root), `namespaces` (unshare,
setns, pivot_root by ctypes), `process` (starting processes in namespaces),
`cgroups` (v1 and v2 behind one interface), `network` (pyroute2 bridge, veths,
published ports), `mounts` (volumes from the volume manager, plugins or host
paths), and the confinement: `capabilities`, `devices` (the device allow-list, a
BPF device program on cgroup v2) and `seccomp` (docker's default profile via
libseccomp). `cli` builds the `strata` parser from the `cmd_*` modules' command
tables (`commands`)."""
