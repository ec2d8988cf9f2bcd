"""strata benchmarks: the same layer and copy-on-write workloads run side by
side on strata-unionfs, kernel overlayfs, fuse-overlayfs, unionfs-fuse and a
plain directory, in one process and one run.

`python -m benchmarks [--full]` (or `make bench [FULL=1]`) writes results.json,
results.md and PNG charts to benchmarks/results/<timestamp>/. In code:
`runner.run(config, systems, workdir, log)` gives the samples and
`report.write(result, out_dir)` the files; `config.QUICK` / `config.FULL` are
the two standard sizes and `systems.ALL` the systems under test.
"""
