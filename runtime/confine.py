"""A container's confinement, from its record: the process spec with capabilities,
seccomp filter and no_new_privs, and the devices it gets. The container's first
process (monitor) and every exec (execute) get their spec here, so an exec'd
process is never less confined than the container's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.errors import StrataError
from runtime import capabilities, devices, process, seccomp

if TYPE_CHECKING:
    from runtime.containers import Container

# A --security-opt seccomp profile, as given at create (docker too keeps the profile, not the file).
SECCOMP_PROFILE = "seccomp.json"


def security_opts(items: list[str]) -> tuple[str | None, bool]:
    """--security-opt as docker takes it: (seccomp=unconfined|FILE or None, no-new-privileges)."""
    profile: str | None = None
    nnp = False
    for item in items:
        key, _, value = item.partition("=" if "=" in item else ":")  # docker's old form: seccomp:FILE
        if key == "seccomp" and value:
            profile = value
        elif key == "no-new-privileges" and value in ("", "true", "false"):
            nnp = value != "false"
        else:
            raise StrataError(f"invalid --security-opt {item!r}: "
                              "seccomp=unconfined|FILE or no-new-privileges")
    return profile, nnp


def process_spec(c: Container, argv: list[str], tty: bool, env: Sequence[str] = (),
                 workdir: str | None = None, user: str | None = None) -> process.ProcessSpec:
    """What runs in c and under which confinement: the container's config, with exec's
    -e, -w and -u over it."""
    cfg, hc = c.record.config, c.record.host_config
    spec = process.ProcessSpec(argv, process.merge_env([*cfg.env, f"HOSTNAME={cfg.hostname}"], env),
                               workdir or cfg.working_dir, user if user is not None else cfg.user, tty)
    spec.caps = capabilities.tweak(hc.cap_add, hc.cap_drop, hc.privileged)
    profile, spec.no_new_privs = security_opts(hc.security_opt)
    if not hc.privileged and profile != "unconfined":
        spec.seccomp = seccomp.build(seccomp.load(c.dir / SECCOMP_PROFILE) if profile
                                     else seccomp.default_profile(), spec.caps)
    return spec


def container_devices(c: Container) -> tuple[devices.Device, ...]:
    """The --device nodes (looked up now: a node's numbers may have changed since
    create), and with --privileged every device of the host, as docker gives them."""
    hc = c.record.host_config
    found = [d.resolve() for d in hc.devices]
    return tuple(devices.host_devices() + found if hc.privileged else found)
