"""The strata container runtime and the `strata` command line."""
