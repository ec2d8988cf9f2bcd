"""Everything a container's first process needs from outside it, set up by its
monitor before the process starts: the rootfs mount (through unionfs.client), the
volumes, the cgroup with its limits and device rules, the veth and an address,
the /etc files. Each step is recorded before it is done, so teardown knows what
to undo whenever the monitor stops, even half-way."""

from __future__ import annotations

from common import kernel
from common.errors import StrataError
from runtime import devices, etc_files, mounts, network, rootfs
from runtime.containers import Container, Runtime
from unionfs import client


def prepare(c: Container, devs: tuple[devices.Device, ...]) -> list[rootfs.Bind]:
    """Set c up for its process; returns what to bind into its root (/etc files, volumes)."""
    hc, layers = c.record.host_config, c.record.layers
    if not kernel.is_mountpoint(layers.merged):
        try:
            client.mount(layers.union(), layers.merged, layers.driver)
        except StrataError as e:
            raise StrataError(f"mounting the rootfs: {e}") from None
    binds: list[rootfs.Bind] = []
    for i, m in enumerate(c.record.mounts):
        with c.editing() as rec:
            rec.state.attached_mounts = list(range(i + 1))
        host_path = mounts.attach(m, c.id, c.rt.root_arg)
        if m.Type == "volume":
            mounts.copy_image_content(rootfs.secure_join(layers.merged, m.Destination), host_path)
        binds.append(rootfs.Bind(host_path, m.Destination, not m.RW))
    cg = c.cgroup()
    cg.create(hc.limits)
    if not hc.privileged:
        cg.allow_devices([*devices.DEFAULT_RULES, *(d.rule() for d in devs)])
    ip = ""
    if hc.network_mode == "bridge":
        def take(address: str) -> None:
            with c.editing() as rec:
                rec.network.ip_address, rec.network.gateway = address, str(network.GATEWAY)

        ip = network.allocate(c.rt.containers_dir / ".network.lock", lambda: _ips_in_use(c.rt), take)
        network.create_veth(c.id)
        with c.editing() as rec:
            rec.network.ports = list(hc.port_bindings)
    elif hc.network_owner is not None:
        ip = c.rt.get(hc.network_owner).record.network.ip_address
    return etc_files.write(c, ip) + binds


def _ips_in_use(rt: Runtime) -> list[str]:
    return [c.record.network.ip_address for c in rt.all()
            if c.record.network.ip_address and c.record.state.status.is_monitored()]
