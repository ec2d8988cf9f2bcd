"""`strata`: the docker-like command line. Thin: each command group lists its
commands in a `cmd_*` module's COMMANDS table (runtime.commands); this module
builds the parser from those tables, dispatches, and turns StrataError into one
line. The table's order is only the order `--help` lists commands in."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.errors import StrataError
from runtime import cmd_containers, cmd_images, cmd_snapshotter, cmd_volumes
from runtime.commands import GROUPS, Command

TABLE: list[Command] = [*cmd_volumes.COMMANDS, *cmd_images.COMMANDS, *cmd_containers.COMMANDS,
                        *cmd_snapshotter.COMMANDS]


def build_parser(table: Sequence[Command] = TABLE) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description="containers on a Python storage stack")
    parser.add_argument("--root", help="state root (default $STRATA_ROOT or /var/lib/strata)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for cmd in table:
        *group, name = cmd.words
        sub = top
        if group:
            (g,) = group
            if g not in groups:
                info = GROUPS[g]
                gp = top.add_parser(g, help=info.help, description=info.description)
                groups[g] = gp.add_subparsers(dest=f"{g}_command", metavar="COMMAND", required=True)
            sub = groups[g]
        p = sub.add_parser(name, help=cmd.help, aliases=list(cmd.aliases), add_help=cmd.add_help,
                           description=cmd.help if cmd.description is None else cmd.description)
        if not cmd.add_help:
            p.add_argument("--help", action="help")
        cmd.arguments(p)
        p.set_defaults(func=cmd.run)
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
