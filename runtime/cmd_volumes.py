"""`strata volume create|ls|inspect|rm|prune` and `strata serve` (the Docker
volume plugin service). Both work on the same state under the state root, so
the commands act correctly whether or not the service is running."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from common.errors import StrataError
from common.paths import state_root
from plugin_api.protocol import DEFAULT_NAME, SOCKET_DIR, SPEC_DIR
from volumes import Volume, VolumeManager
from volumes.names import check_name

from .commands import Command
from .output import human_size, print_json, print_table

# The plugin name of the shared (CephFS) volumes, beside DEFAULT_NAME's local ones.
SHARED_NAME = "strata-shared"


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StrataError(f"invalid {what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _manager(args: argparse.Namespace) -> VolumeManager:
    return VolumeManager.open(args.root, args.config)


def _inspect_json(vol: Volume) -> dict[str, Any]:
    return {
        "Name": vol.name, "Driver": "strata", "Type": vol.type, "Mountpoint": str(vol.mountpoint),
        "CreatedAt": vol.created_at, "Options": vol.options, "Labels": vol.labels, "Scope": "local",
        "Status": vol.status,
    }


def cmd_create(args: argparse.Namespace) -> int:
    name = args.name or secrets.token_hex(32)  # docker names anonymous volumes the same way
    vol = _manager(args).create(name, _key_values(args.opt, "option"), _key_values(args.label, "label"))
    print(vol.name)
    return 0


def _size(n: int) -> str:
    return "-" if n < 0 else human_size(n)  # -1: not counted (too many entries, image not mounted)


def cmd_ls(args: argparse.Namespace) -> int:
    vols = _manager(args).list_volumes(with_status=not args.quiet)
    if args.quiet:
        for v in vols:
            print(v.name)
    elif args.format == "json":
        print_json([_inspect_json(v) for v in vols])
    else:
        print_table(
            ["VOLUME NAME", "TYPE", "MOUNTS", "SIZE", "CREATED"],
            [[v.name, v.type, v.status["MountCount"], _size(v.status.get("Size", 0)), v.created_at]
             for v in vols],
        )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    found, errors = [], []
    for name in args.names:
        try:
            found.append(_inspect_json(mgr.get(name)))
        except StrataError as e:
            errors.append(str(e))
    print_json(found)
    for message in errors:
        print(f"strata: {message}", file=sys.stderr)
    return 1 if errors else 0


def cmd_rm(args: argparse.Namespace) -> int:
    mgr, failed = _manager(args), False
    for name in args.names:
        try:
            mgr.remove(name, force=args.force)
            print(name)
        except StrataError as e:
            print(f"strata: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def cmd_prune(args: argparse.Namespace) -> int:
    if not args.force:
        if not sys.stdin.isatty():
            raise StrataError("prune removes every unused volume and its data: pass -f to confirm")
        answer = input("WARNING! This will remove all volumes not mounted by anything. Continue? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    removed = _manager(args).prune()
    if removed:
        print("Deleted Volumes:")
        for name, _ in removed:
            print(name)
        print()
    print(f"Total reclaimed space: {human_size(sum(size for _, size in removed))}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # aiohttp is a third of a second to import: only the server pays for it, not every CLI call.
    from plugin_api.graph_store import GraphStore
    from plugin_api.server import PluginService, serve_until_signalled

    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="strata serve: %(levelname)s %(message)s"
    )
    manager = _manager(args)
    graph = None if args.no_graphdriver else GraphStore(
        Path(os.path.realpath(state_root(args.root))) / "graph", unionfs=manager.config.unionfs)
    services = [PluginService(manager, *_plugin_socket(args.name, args.socket, args.spec_dir), graph=graph)]
    if manager.config.cephfs is not None:  # the shared volumes: a plugin of their own, Scope global
        from volumes.drivers.cephfs import SharedVolumes

        shared = SharedVolumes(state_root(args.root) / "shared-volumes", manager.config)
        services.append(PluginService(shared, *_plugin_socket(args.shared_name, args.shared_socket,
                                                              args.spec_dir)))
    asyncio.run(serve_until_signalled(*services))
    return 0


def _plugin_socket(name: str, sock: str | None, spec_dir: str) -> tuple[Path, Path | None]:
    """A plugin's socket path and, when Docker would not find it by itself, its spec file."""
    from plugin_api.server import spec_path_for

    try:  # a plugin name is a socket's and a spec file's name: the volume-name rule
        check_name(name)
    except StrataError as e:
        raise StrataError(f"invalid plugin name {name!r}, by the volume-name rule: {e}") from None
    socket_path = Path(sock) if sock else SOCKET_DIR / f"{name}.sock"
    if not socket_path.is_absolute():
        raise StrataError(f"socket must be an absolute path, not {sock}")
    return socket_path, spec_path_for(name, socket_path, Path(spec_dir))


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", help="volume config file (default $STRATA_VOLUMES_CONFIG or /etc/strata/volumes.json)"
    )


def _create_arguments(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("name", nargs="?", help="volume name (random if omitted)")
    p.add_argument("-o", "--opt", action="append", metavar="KEY=VALUE", help="driver option, e.g. type=tmpfs")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="set a label")


def _ls_arguments(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("-q", "--quiet", action="store_true", help="only names")
    p.add_argument("--format", choices=["table", "json"], default="table")


def _names_arguments(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("names", nargs="+", metavar="NAME")


def _rm_arguments(p: argparse.ArgumentParser) -> None:
    _names_arguments(p)
    p.add_argument("-f", "--force", action="store_true",
                   help="remove even with mount references (ones a crashed client never released)")


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _config(p)
    p.add_argument("--name", default=DEFAULT_NAME, help="plugin name Docker knows it by (default strata)")
    p.add_argument("--socket", help="socket path (default /run/docker/plugins/NAME.sock; elsewhere a "
                   "spec file is written for Docker)")
    p.add_argument("--spec-dir", default=str(SPEC_DIR), help="where to write NAME.spec (default %(default)s)")
    p.add_argument("--shared-name", default=SHARED_NAME,
                   help="plugin name of the shared (CephFS, Scope global) volumes, served when the volume "
                   "config has a cephfs section (default %(default)s)")
    p.add_argument("--shared-socket", help="its socket (default /run/docker/plugins/SHARED_NAME.sock)")
    p.add_argument("-d", "--debug", action="store_true", help="log every request")
    p.add_argument("--no-graphdriver", action="store_true",
                   help="serve only VolumeDriver, not Docker's GraphDriver (layers under STATE_ROOT/graph)")


COMMANDS = [
    Command(("volume", "create"), "create a volume", cmd_create, _create_arguments,
            description="Create a volume. Types: local (default), bind (device=), clone (from=), tmpfs "
            "(size=); all but bind take uid=, gid=, mode=."),
    Command(("volume", "ls"), "list volumes", cmd_ls, _ls_arguments, description="", aliases=("list",)),
    Command(("volume", "inspect"), "show volumes in detail (JSON)", cmd_inspect, _names_arguments,
            description=""),
    Command(("volume", "rm"), "remove unused volumes", cmd_rm, _rm_arguments, description="",
            aliases=("remove",)),
    Command(("volume", "prune"), "remove all volumes nothing has mounted", cmd_prune, _prune_arguments,
            description=""),
    Command(("serve",), "run the Docker plugin service (volumes and storage driver)", cmd_serve,
            _serve_arguments,
            description="Serve the Docker VolumeDriver and GraphDriver protocols on a unix socket until "
            "SIGTERM. Use with: docker volume create -d strata [-o type=...] NAME; and as dockerd's "
            "storage driver (Docker <= 27): dockerd --experimental --storage-driver strata"),
]
