"""The container's own layer: `diff` (what changed, read from the upper), `commit`
(an image from it, through the image store) and `export` (the merged tree as one
tar, from a read-only union of the layer over the image's, through
unionfs.client). All three see only the image's layers below the container's:
the init layer (the runtime's mount points) never shows."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from common.errors import StrataError
from images.changes import changes
from images.produce import produce_layer
from runtime.containers import Container
from runtime.record import Status
from unionfs import client


def diff(c: Container) -> list[tuple[str, str]]:
    """docker diff: (A|C|D, path) from the container's upper over the image's layers
    (images.changes)."""
    layers = c.record.layers
    try:
        return changes(Path(layers.upper), [Path(p) for p in layers.image_layers])
    except OSError as e:
        raise StrataError(f"cannot read the changes of {c.name}: {e.strerror or e}") from None


def commit(c: Container, tag: str | None, message: str, author: str,
           changes: dict[str, Any] | None = None, pause: bool = True) -> str:
    """A new image from the container's changes. A running container is frozen
    meanwhile (docker's default; pause=False reads its upper while it runs, which
    may fail with a one-line error if it changes underneath)."""
    cfg = c.record.config
    container_config = {"Env": cfg.env, "Cmd": cfg.cmd, "Entrypoint": cfg.entrypoint or None,
                        "WorkingDir": "" if cfg.working_dir == "/" else cfg.working_dir,
                        "User": cfg.user, **(changes or {})}
    with _frozen(c, pause):
        return c.rt.store.commit(c.record.image, Path(c.record.layers.upper),
                                 created_by=f"strata commit {c.name}", tag=tag, comment=message,
                                 author=author, container_config=container_config)


@contextlib.contextmanager
def _frozen(c: Container, pause: bool) -> Iterator[None]:
    """Freeze a running container for the with-block (thawed after, also on failure)."""
    if not pause or c.status() is not Status.RUNNING:
        yield
        return
    cg = c.cgroup()
    cg.freeze()
    try:
        yield
    finally:
        cg.thaw()


def export(c: Container, out: BinaryIO) -> None:
    """The merged filesystem as one tar, through a read-only union of its layers."""
    layers = c.record.layers
    view = Path(c.rt.store.tmp_dir) / f"export-{c.id[:12]}-{os.getpid()}"
    view.mkdir()
    try:
        try:
            client.mount(client.Union([layers.upper, *layers.image_layers]), view)
        except StrataError as e:
            raise StrataError(f"mounting the container's layers: {e}") from None
        try:
            produce_layer(view, out)
        finally:
            client.unmount(view)
    finally:
        view.rmdir()
