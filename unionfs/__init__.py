"""strata's union filesystem: `strata-unionfs`, a FUSE copy-on-write union
with the semantics and on-disk format of the kernel's overlayfs (a drop-in for
fuse-overlayfs), and `client`, the one way every other package mounts it.
Modules: `launcher.c` and `launch` (the command: hands the mount to the
resident `service`, which forks each mount's daemon, or mounts itself), `cli`
(the mount program), `options` (the -o table), `fs` (the FUSE operations: one
request loop, long work beside it, passthrough), `layers` (anchored lookup
through the stack), `inodes` (numbers and nodes), `copyup` (the copy-up
collaborator), `whiteout` (the one owner of the whiteout and opaque formats),
`client`. Imports only `common`.
"""
