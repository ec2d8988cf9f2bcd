"""A row of the `strata` command table, and the groups commands may live under.

Each `cmd_*` module lists its commands as `COMMANDS`; runtime.cli builds the
parser from the concatenation, creating a group's parser when a command first
needs it. So no module depends on another having registered first, and nothing
reaches into argparse's internals to find a group again."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    """`words`: ("ps",) or, under a group, ("system", "prune"). `arguments` declares
    its flags on the parser; `run` does the work (its return is the exit status).
    `description` defaults to `help` ("" for none). add_help=False: `-h` is one of
    the command's own flags (--hostname), so only `--help` asks for help."""

    words: tuple[str, ...]
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    description: str | None = None
    aliases: tuple[str, ...] = ()
    add_help: bool = True


@dataclass(frozen=True)
class Group:
    help: str
    description: str | None = None


GROUPS = {
    "image": Group("manage images"),
    "volume": Group("manage volumes", "Manage strata volumes."),
    "system": Group("store-wide information and maintenance"),
}
