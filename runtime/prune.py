"""`system prune`, after a crash of strata: finish containers whose monitor died,
kill those whose root filesystem's daemon died (their monitor then cleans up),
then remove what no live container of this state root owns -- rootfs mounts,
veths, the unused bridge, cgroups -- and half-created or half-removed container
directories."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from common import kernel
from common.errors import StrataError
from common.tree import remove_path
from runtime import cgroups, network
from runtime.containers import Runtime
from runtime.teardown import finish
from unionfs import client


def prune(rt: Runtime) -> list[str]:
    """Returns what it did, one line each."""
    done: list[str] = []
    live: set[str] = set()
    for c in rt.all():
        st = c.record.state
        if st.status.is_monitored() and not c.monitor_alive():
            with c.locked():
                finish(c, None, error="the container's monitor died")
            done.append(f"container {c.name}: monitor gone, stopped and cleaned up")
        elif st.status.is_monitored():
            live.add(c.id)
            if not client.alive(c.record.layers.merged) and c.process_alive():
                # its strata-unionfs daemon died: the container cannot go on; its monitor cleans up
                if c.cgroup().frozen():
                    c.cgroup().thaw()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(st.pid, signal.SIGKILL)
                done.append(f"container {c.name}: its root filesystem daemon died, container killed")
    known = {c.id for c in rt.all()}
    prefix = str(rt.containers_dir) + "/"
    for _src, target, fstype, _ in kernel.mounts():
        cid = Path(target).parent.name
        if target.startswith(prefix) and (cid not in live or cid not in known):
            done.append(f"unmounted {target} ({fstype})")
            try:
                client.unmount(target)
            except StrataError as e:
                done.append(str(e))
    for veth in network.leftover_veths():
        if not any(cid.startswith(veth) for cid in live):
            network.remove_veth(veth)
            done.append(f"removed veth vs{veth}")
    if network.remove_unused_bridge():
        done.append(f"removed the unused bridge {network.BRIDGE}")
    # Only this root's: another state root's containers share the strata/ cgroup parent.
    ours = {d.name.removeprefix(".rm-").removeprefix(".new-") for d in rt.containers_dir.iterdir()}
    for cg in cgroups.leftovers():
        if cg.name in ours and cg.name not in live:
            cg.destroy()
            done.append(f"removed cgroup {cg.version} strata/{cg.name}")
    for d in rt.containers_dir.iterdir():
        if d.name.startswith((".new-", ".rm-")):
            try:
                remove_path(d)
                done.append(f"removed leftover {d.name}")
            except OSError as e:
                done.append(f"could not remove leftover {d.name}: {e.strerror or e}")
    return done
