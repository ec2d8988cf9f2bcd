"""`strata`: the docker-like command line. Thin: each command group lives in a
`cmd_*` module with a `register(subparsers)` that sets `func` on its parsers;
this module only parses, dispatches and turns StrataError into one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.errors import StrataError

# Each module registers its verbs; add a group by adding its module here.
COMMAND_MODULES: list[str] = ["runtime.cmd_volumes", "runtime.cmd_images", "runtime.cmd_containers"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="strata", description="containers on a Python storage stack")
    parser.add_argument("--root", help="state root (default $STRATA_ROOT or /var/lib/strata)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except StrataError as e:
        print(f"strata: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
