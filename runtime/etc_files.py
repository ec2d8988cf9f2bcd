"""A container's /etc/hostname, /etc/hosts and /etc/resolv.conf. Written into its
directory at every start (its address may have changed) and bound over the empty
files of the init layer, so they never land in the container's own layer, as
docker does it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from runtime import rootfs

if TYPE_CHECKING:
    from runtime.containers import Container

FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")


def write(c: Container, ip: str) -> list[rootfs.Bind]:
    """Write c's files for address ip ("" without one); returns the binds for them."""
    cfg, hc = c.record.config, c.record.host_config
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if ip:
        hosts.append(f"{ip}\t{cfg.hostname}")
    hosts += [f"{a}\t{n}" for n, a in hc.extra_hosts]
    (c.dir / "hosts").write_text("\n".join(hosts) + "\n")
    (c.dir / "hostname").write_text(cfg.hostname + "\n")
    if hc.dns:
        resolv = "".join(f"nameserver {d}\n" for d in hc.dns)
    else:
        try:
            resolv = Path("/etc/resolv.conf").read_text()
        except OSError:
            resolv = ""
    (c.dir / "resolv.conf").write_text(resolv)
    return [rootfs.Bind(str(c.dir / Path(f).name), "/" + f) for f in FILES]
