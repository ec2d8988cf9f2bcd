"""The small floor every strata package may import, and which imports none of
them: `errors` (the one error type), `kernel` (libc calls Python lacks: mount,
renameat2, fallocate, setns), `paths` (state and run roots, root-only
directories), `parsing` (the one size grammar, JSON depth), `tree` (removing a
tree) and `dirwalk` (walking one), both anchored to fds and without recursion,
`atomic` (writes by rename), `daemon` (daemonizing, process titles) and
`cgroupfs` (where cgroups are mounted, joining another process's).
"""
