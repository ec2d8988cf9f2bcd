"""The container's own layer: `diff` (what changed, read from the upper), `commit`
(an image from it, through the image store) and `export` (the merged tree as one
tar, from a read-only union of the layer over the image's, through
unionfs.client). All three see only the image's layers below the container's:
the init layer (the runtime's mount points) never shows. Whiteouts are read as
unionfs.whiteout defines them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from common import dirwalk
from common.errors import StrataError
from images.produce import produce_layer
from runtime.containers import Container
from runtime.record import Status
from unionfs import client, whiteout


def diff(c: Container) -> list[tuple[str, str]]:
    """docker diff: (A|C|D, path) from the container's upper dir, read anchored and
    without recursion (dirwalk), however deep the container made it."""
    layers = c.record.layers
    lowers = [Path(p) for p in layers.image_layers]
    out: list[tuple[str, str]] = []
    top = os.open(layers.upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dirs, entry in dirwalk.walk(top):
            rel = "/".join([*dirs.names, entry.name])
            if whiteout.is_whiteout(entry.stat(follow_symlinks=False)):
                out.append(("D", "/" + rel))
            else:
                out.append(("C" if any(_exists_in(lw, rel) for lw in lowers) else "A", "/" + rel))
    except OSError as e:
        raise StrataError(f"cannot read the changes of {c.name}: {e.strerror or e}") from None
    finally:
        os.close(top)
    return sorted(out, key=lambda x: x[1])


def _exists_in(layer: Path, rel: str) -> bool:
    """Whether an image layer (root's, never changed) holds rel; past PATH_MAX one
    name at a time from the layer's fd."""
    if len(rel) < 3000:
        return os.path.lexists(layer / rel)
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in rel.split("/"):
            nxt = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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
