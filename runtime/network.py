"""Container networking with pyroute2: the `strata0` bridge, a veth pair per
container (host end on the bridge, the other moved into the container's network
namespace as eth0), addresses handed out without collisions, a default route via
the bridge, and `-p HOST:CONTAINER` published on the host's loopback by a small
TCP proxy living in the container's monitor."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import StrataError

if TYPE_CHECKING:
    from pyroute2 import IPRoute


def _iproute() -> IPRoute:
    """pyroute2 costs a fifth of a second to import: only containers that use it pay."""
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    return NetlinkError

BRIDGE = "strata0"
SUBNET = ipaddress.ip_network("10.77.0.0/24")
GATEWAY = SUBNET.network_address + 1
MODES = ("none", "host", "bridge")


@dataclass(frozen=True)
class Port:
    host: int
    container: int

    @classmethod
    def parse(cls, spec: str) -> Port:
        """HOST:CONTAINER[/tcp] (published on 127.0.0.1)."""
        body = spec.removesuffix("/tcp")
        host, sep, cont = body.rpartition(":")
        host = host.removeprefix("127.0.0.1:")
        try:
            port = cls(int(host), int(cont)) if sep else cls(int(cont), int(cont))
        except ValueError:
            raise StrataError(f"invalid port specification {spec!r}: expected HOST:CONTAINER") from None
        if not (0 < port.host < 65536 and 0 < port.container < 65536):
            raise StrataError(f"invalid port specification {spec!r}: ports are 1-65535")
        return port


def check_mode(mode: str) -> str:
    if mode in MODES or joined_container(mode):
        return mode
    raise StrataError(f"invalid --network {mode!r}: expected none, host, bridge or container:NAME")


def joined_container(mode: str) -> str | None:
    """NAME of `--network container:NAME`: the container whose network namespace is joined."""
    kind, sep, name = mode.partition(":")
    return name if kind == "container" and sep and name else None


def veth_names(container_id: str) -> tuple[str, str]:
    return f"vs{container_id[:10]}", f"vc{container_id[:10]}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def allocate(lock_path: Path, in_use: Callable[[], Iterable[str]], record: Callable[[str], None]) -> str:
    """The lowest free address of the subnet; `record` stores it (under the lock) so the
    next allocation sees it in `in_use`."""
    with _locked(lock_path):
        taken = set(in_use())
        for host in SUBNET.hosts():
            if host != GATEWAY and str(host) not in taken:
                record(str(host))
                return str(host)
    raise StrataError(f"no free address left in {SUBNET}")


def ensure_bridge(ipr: IPRoute) -> int:
    idx = ipr.link_lookup(ifname=BRIDGE)
    if not idx:
        with contextlib.suppress(_netlink_error()):  # another container created it meanwhile
            ipr.link("add", ifname=BRIDGE, kind="bridge")
        idx = ipr.link_lookup(ifname=BRIDGE)
    index = int(idx[0])
    addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET)]
    if str(GATEWAY) not in addrs:
        with contextlib.suppress(_netlink_error()):
            ipr.addr("add", index=index, address=str(GATEWAY), prefixlen=SUBNET.prefixlen)
    ipr.link("set", index=index, state="up")
    return index


def create_veth(container_id: str) -> None:
    """The pair, host end up on the bridge; the peer waits to be moved into the container."""
    host, peer = veth_names(container_id)
    with _iproute() as ipr:
        bridge = ensure_bridge(ipr)
        remove_veth(container_id, ipr)
        ipr.link("add", ifname=host, kind="veth", peer=peer)
        index = ipr.link_lookup(ifname=host)[0]
        ipr.link("set", index=index, master=bridge, state="up")


def move_peer(container_id: str, pid: int) -> None:
    _, peer = veth_names(container_id)
    with _iproute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=peer)[0], net_ns_pid=pid)


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """`ip link set lo up` by ioctl, without loading netlink machinery."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def configure_inside(container_id: str | None, address: str | None) -> None:
    """In the container's network namespace: lo up, and eth0 with its address and route."""
    loopback_up()
    if container_id is None or address is None:
        return
    with _iproute() as ipr:
        _, peer = veth_names(container_id)
        index = ipr.link_lookup(ifname=peer)[0]
        ipr.link("set", index=index, ifname="eth0")
        ipr.addr("add", index=index, address=address, prefixlen=SUBNET.prefixlen)
        ipr.link("set", index=index, state="up")
        ipr.route("add", dst="default", gateway=str(GATEWAY))


def remove_veth(container_id: str, ipr: IPRoute | None = None) -> bool:
    """Delete the host end (the peer goes with it); True when there was one."""
    host, _ = veth_names(container_id)
    own = ipr is None
    ipr = ipr or _iproute()
    try:
        idx = ipr.link_lookup(ifname=host)
        if idx:
            with contextlib.suppress(_netlink_error()):
                ipr.link("del", index=idx[0])
            return True
        return False
    finally:
        if own:
            ipr.close()


def remove_unused_bridge() -> bool:
    """Delete the bridge when no veth is attached to it any more (of any state root)."""
    with _iproute() as ipr:
        idx = ipr.link_lookup(ifname=BRIDGE)
        if not idx:
            return False
        if any(link.get_attr("IFLA_MASTER") == idx[0] for link in ipr.get_links()):
            return False
        with contextlib.suppress(_netlink_error()):
            ipr.link("del", index=idx[0])
        return True


def leftover_veths() -> list[str]:
    """Container ids (10-hex prefixes) of the host ends of strata veths present now."""
    with _iproute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [n[2:] for n in names if n and n.startswith("vs") and len(n) == 12]


# --- publishing ports on loopback ---------------------------------------------------------


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve_connection(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=5)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
    back.start()
    _pipe(client, upstream)
    back.join()
    client.close()
    upstream.close()


def listen(ports: list[Port]) -> list[socket.socket]:
    """Bind every published port first, so a port in use fails the start cleanly."""
    socks = []
    try:
        for p in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p.host))
            except OSError as e:
                s.close()
                raise StrataError(f"cannot publish 127.0.0.1:{p.host}: {e.strerror}") from None
            s.listen(64)
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def proxy(socks: list[socket.socket], ports: list[Port], address: str) -> None:
    """Forward connections to each listening socket to the container's port (threads)."""

    def accept_loop(s: socket.socket, port: int) -> None:
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=_serve_connection, args=(client, (address, port)), daemon=True).start()

    for s, p in zip(socks, ports, strict=True):
        threading.Thread(target=accept_loop, args=(s, p.container), daemon=True).start()
