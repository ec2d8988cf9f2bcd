"""Image commands: `strata image VERB` and docker's top-level shortcuts (`images`, `rmi`,
`tag`, `history`, `load`, `save`, `pull`, `push`, `import`), plus `strata system df|dedup`.
Thin: parsing and presentation here, the work in images.store and its neighbours."""

from __future__ import annotations

import argparse
import datetime
import functools
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import StrataError
from images import dedup, formats
from images.store import Image, Store
from runtime.commands import Command
from runtime.output import Progress, human_size, print_json, print_table


def _os_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A file the user named that cannot be read or written is their error, not a traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise StrataError(f"{where}{e.strerror or e}") from None

    return run


def _store(args: argparse.Namespace) -> Store:
    return Store(args.root)


def _ago(created: str) -> str:
    try:
        when = datetime.datetime.fromisoformat(created)
    except ValueError:
        return "N/A"
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    secs = (datetime.datetime.now(datetime.UTC) - when).total_seconds()
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = int(secs // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "Less than a minute ago"


def _progress(label: str, total: int | None = None) -> Progress:
    # sys.stderr looked up now, not when output.py was imported (it may have been replaced since).
    return Progress(label, total, sys.stderr)


def _short(image_id: str) -> str:
    return image_id.split(":", 1)[1][:12]


def _split_tag(tag: str) -> tuple[str, str]:
    name, _, t = tag.rpartition(":")
    return name, t


# --- import / images / rmi / tag / inspect / history ------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    src = Path(args.source)
    total = src.stat().st_size if src.is_file() else None
    with _progress(f"importing {src.name}", total) as bar:
        image_id = _store(args).import_rootfs(src, args.reference, progress=bar.advance)
    print(image_id)
    return 0


def _image_row(img: Image) -> list[dict[str, Any]]:
    tags = img.tags or ["<none>:<none>"]
    return [
        {"Repository": _split_tag(t)[0], "Tag": _split_tag(t)[1], "ID": img.id, "Created": img.created,
         "Size": img.size}
        for t in tags
    ]


def cmd_images(args: argparse.Namespace) -> int:
    rows = [r for img in _store(args).images() for r in _image_row(img)]
    if args.filter_ref:
        rows = [r for r in rows if r["Repository"] == args.filter_ref or
                f"{r['Repository']}:{r['Tag']}" == args.filter_ref]
    rows.sort(key=lambda r: (r["Repository"], r["Tag"]))
    if args.quiet:
        for image_id in dict.fromkeys(_short(r["ID"]) for r in rows):
            print(image_id)
    elif args.format == "json":
        print_json(rows, sys.stdout)
    else:
        print_table(
            ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
            [[r["Repository"], r["Tag"], _short(r["ID"]), _ago(r["Created"]), human_size(r["Size"])]
             for r in rows],
            sys.stdout,
        )
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    store, failed = _store(args), 0
    for ref in args.images:
        try:
            for line in store.remove(ref, force=args.force):
                print(line)
        except StrataError as e:
            print(f"strata: {e}", file=sys.stderr)
            failed = 1
    return failed


def cmd_tag(args: argparse.Namespace) -> int:
    _store(args).tag(args.source, args.target)
    return 0


def inspect_data(img: Image) -> dict[str, Any]:
    """docker image inspect's shape, with the layer dirs where docker shows GraphDriver data."""
    cfg = img.config
    return {
        "Id": img.id,
        "RepoTags": img.tags,
        "Created": img.created,
        "Author": cfg.get("author", ""),
        "Architecture": cfg.get("architecture", ""),
        "Os": cfg.get("os", ""),
        "Config": cfg.get("config", {}),
        "Size": img.size,
        "RootFS": {"Type": "layers", "Layers": [layer.diff_id for layer in img.layers]},
        "GraphDriver": {
            "Name": "strata-unionfs",
            "Data": {"LowerDir": ":".join(str(d) for d in img.lowerdirs)},
        },
        "Metadata": {"ChainIDs": [layer.chain_id for layer in img.layers]},
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args)
    print_json([inspect_data(store.image(ref)) for ref in args.images], sys.stdout)
    return 0


def history_rows(img: Image) -> list[dict[str, Any]]:
    """One row per history entry, newest first; sizes from the layer each non-empty entry made."""
    layers = list(img.layers)
    rows = []
    entries = img.config.get("history") or [{} for _ in layers]
    for entry in entries:
        size = 0
        if not entry.get("empty_layer") and layers:
            size = layers.pop(0).size
        rows.append({"Created": entry.get("created", ""), "CreatedBy": entry.get("created_by", ""),
                     "Size": size, "Comment": entry.get("comment", "")})
    rows.reverse()
    for i, row in enumerate(rows):
        row["ID"] = img.id if i == 0 else "<missing>"
    return rows


def cmd_history(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = history_rows(store.image(args.image))
    if args.format == "json":
        print_json(rows, sys.stdout)
        return 0

    def trunc(s: str) -> str:
        return s if args.no_trunc or len(s) <= 45 else s[:44] + "…"

    print_table(
        ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
        [[_short(r["ID"]) if r["ID"] != "<missing>" else r["ID"], _ago(r["Created"]), trunc(r["CreatedBy"]),
          human_size(r["Size"]), r["Comment"]] for r in rows],
        sys.stdout,
    )
    return 0


# --- load / save / pull / push ---------------------------------------------------------


def cmd_load(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.input in (None, "-"):
        if sys.stdin.isatty():
            raise StrataError("load: give -i ARCHIVE or pipe an archive on stdin")
        with tempfile.NamedTemporaryFile(dir=store.tmp_dir.parent, prefix=".stdin-") as tmp:
            shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
            tmp.flush()
            return _load(store, Path(tmp.name))
    return _load(store, Path(args.input))


def _load(store: Store, path: Path) -> int:
    # Layer bytes are most of an archive: its size is a fair total for the bar.
    with _progress(f"loading {path.name}", path.stat().st_size if path.is_file() else None) as bar:
        loaded = formats.load(store, path, progress=bar.advance)
    for image_id, tags in loaded:
        for t in tags:
            print(f"Loaded image: {t}")
        if not tags:
            print(f"Loaded image ID: {image_id}")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.output is None and sys.stdout.isatty():
        raise StrataError("save: refusing to write an archive to a terminal; use -o FILE")
    out = Path(args.output) if args.output else None
    if args.format == "oci-dir":
        if out is None:
            raise StrataError("save --format oci-dir needs -o DIR")
        formats.save_oci_layout(store, args.images, out)
    elif out is None:
        formats.save_archive(store, args.images, sys.stdout.buffer, oci=args.format == "oci")
    else:
        formats.save_archive_file(store, args.images, out, oci=args.format == "oci")
    return 0


def _transfer_progress(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    bar = _progress(label)

    def report(done: int, total: int) -> None:
        bar.total = total or None
        bar.advance(done - bar.done)

    return bar, report


def cmd_pull(args: argparse.Namespace) -> int:
    from images import registry  # aiohttp: imported only by the commands that talk HTTP

    bar, report = _transfer_progress(f"pulling {args.reference}")
    with bar:
        image_id = registry.pull(_store(args), args.reference, insecure=args.insecure, progress=report)
    print(image_id)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from images import registry  # aiohttp: imported only by the commands that talk HTTP

    bar, report = _transfer_progress(f"pushing {args.reference}")
    with bar:
        digest = registry.push(_store(args), args.reference, insecure=args.insecure, progress=report)
    print(f"{args.reference}: digest: {digest}")
    return 0


# --- system df / dedup -----------------------------------------------------------------


def cmd_df(args: argparse.Namespace) -> int:
    usage = dedup.disk_usage(_store(args))
    if args.format == "json":
        print_json(usage, sys.stdout)
        return 0
    print_table(
        ["TYPE", "TOTAL", "SIZE", "ON DISK", "DEDUP SAVED"],
        [
            ["Images", usage["images"], "", "", ""],
            ["Layers", usage["layers"], human_size(usage["layers_size"]), human_size(usage["layers_on_disk"]),
             human_size(usage["dedup_saved"])],
            ["Blobs", usage["blobs"], human_size(usage["blobs_size"]), human_size(usage["blobs_size"]), ""],
        ],
        sys.stdout,
    )
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    store = _store(args)
    with _progress("deduplicating") as bar:
        result = dedup.deduplicate(store, progress=bar.advance)
    print(f"shared {result.files_linked} files ({result.method}s), saved {human_size(result.bytes_saved)}")
    return 0


# --- arguments -------------------------------------------------------------------------


def _fmt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format")


def _args_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="rootfs tarball (plain, gzip, zstd) or directory")
    p.add_argument("reference", nargs="?", help="NAME[:TAG] for the new image")


def _args_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter_ref", nargs="?", metavar="REPOSITORY[:TAG]", help="only this repository/tag")
    p.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    _fmt(p)


def _args_rmi(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-f", "--force", action="store_true", help="remove an image id with several tags")


def _args_tag(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")


def _args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")


def _args_history(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-trunc", action="store_true", help="do not shorten CREATED BY")
    _fmt(p)


def _args_load(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", help="docker save archive (.tar[.gz]) or OCI layout (dir or tar)")


def _args_save(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", help="archive file (or directory for oci-dir); default stdout")
    p.add_argument(
        "--format", choices=["docker", "oci", "oci-dir"], default="docker",
        help="docker: a `docker load` archive (default); oci: OCI layout in a tar; oci-dir: OCI layout dir",
    )


def _args_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="NAME[:TAG|@DIGEST]", help="e.g. 127.0.0.1:5000/busybox:latest")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a registry on loopback)")


def _args_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="NAME[:TAG]", help="a local image named for its registry")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (a registry on loopback)")


# (name under `image`, top-level shortcut, help, what runs it, its arguments)
_VERBS: list[tuple[str, str | None, str, Callable[[argparse.Namespace], int],
                   Callable[[argparse.ArgumentParser], None]]] = [
    ("import", "import", "create an image from a rootfs tarball or directory", cmd_import, _args_import),
    ("ls", "images", "list images", cmd_images, _args_images),
    ("rm", "rmi", "remove images (and the layers no other image uses)", cmd_rmi, _args_rmi),
    ("tag", "tag", "give an image another name", cmd_tag, _args_tag),
    ("inspect", None, "show image details as JSON", cmd_inspect, _args_inspect),
    ("history", "history", "show the layers an image was built from", cmd_history, _args_history),
    ("load", "load", "load images from a docker save archive or an OCI layout", cmd_load, _args_load),
    ("save", "save", "write images to an archive docker load accepts (or an OCI layout)", cmd_save,
     _args_save),
    ("pull", "pull", "pull an image from a registry (v2 API)", cmd_pull, _args_pull),
    ("push", "push", "push an image to a registry (v2 API)", cmd_push, _args_push),
]

COMMANDS = [
    *(Command(words, help_, _os_errors(run), arguments)
      for name, top, help_, run, arguments in _VERBS
      for words in [("image", name), *([(top,)] if top else [])]),
    Command(("system", "df"), "disk usage of images and layers, and what dedup saved", _os_errors(cmd_df),
            _fmt, description=""),
    Command(("system", "dedup"), "share identical files across layers (verified byte for byte)",
            _os_errors(cmd_dedup), description=""),
]
