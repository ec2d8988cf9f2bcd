"""`strata snapshotter`: serve containerd's snapshots API (a proxy snapshotter plugin)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.errors import StrataError
from common.paths import run_root, state_root
from runtime.commands import Command

SOCKET_NAME = "snapshotter.sock"


def cmd_snapshotter(args: argparse.Namespace) -> int:
    # grpcio and the generated stubs load only here, not for every CLI call.
    from plugin_api.snapshot_store import SnapshotStore
    from plugin_api.snapshotter import SnapshotterServer

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="strata snapshotter: %(levelname)s %(message)s")
    address = Path(args.address) if args.address else run_root() / SOCKET_NAME
    if not address.is_absolute():
        raise StrataError(f"--address must be an absolute path, not {args.address}")
    store = SnapshotStore(state_root(getattr(args, "root", None)) / "snapshotter", premount=args.premount)
    try:
        SnapshotterServer(store, address).run_until_signalled()
    finally:
        store.close()
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"unix socket to serve on (default /run/strata/{SOCKET_NAME})")
    # The same destination as `strata --root`, so either place works; SUPPRESS keeps an
    # absent one here from overwriting the global one.
    p.add_argument("--root", default=argparse.SUPPRESS,
                   help="state root (default $STRATA_ROOT or /var/lib/strata); "
                   "the snapshots go to ROOT/snapshotter")
    p.add_argument("--premount", action="store_true",
                   help="mount each union here and hand containerd a bind mount of it, so containerd runs "
                   "no mount helper (its 1.6 shim can lose a helper's exit status: containerd issue #4387)")
    p.add_argument("-d", "--debug", action="store_true", help="log every request")


COMMANDS = [
    Command(("snapshotter",), "serve containerd's snapshots API (a proxy snapshotter)", cmd_snapshotter,
            _arguments,
            description="Serve containerd's snapshots gRPC API on a unix socket until SIGTERM. In "
            'containerd\'s config: [proxy_plugins.strata] type = "snapshot" '
            'address = "/run/strata/snapshotter.sock"; '
            "then: ctr run --snapshotter strata ..."),
]
