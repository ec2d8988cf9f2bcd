"""Generate the Python stubs of containerd's snapshots API (run by `make`, never committed).

The `.proto` files are Debian's (golang-github-containerd-containerd-dev 1.6.20). They carry
gogoproto options (Go code-generation hints: custom names, non-nullable fields) and import
`gogoproto/gogo.proto`; none of it changes the wire format, so they are stripped here rather
than dragging gogo's descriptor into Python. The files are rewritten below `build/proto` under
the import path `plugin_api/_proto/...`, so the generated modules import each other as
`plugin_api._proto...` and live in the git-ignored package directory `plugin_api/_proto`.

    python -m plugin_api.protogen [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

GOCODE = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
PACKAGE = "plugin_api/_proto"
# (path below the containerd api dir, path below PACKAGE)
FILES = [
    ("types/mount.proto", "containerd/types/mount.proto"),
    ("services/snapshots/v1/snapshots.proto", "containerd/services/snapshots/v1/snapshots.proto"),
]
_IMPORT_FROM = "github.com/containerd/containerd/api/"
_GOGO_IMPORT = re.compile(r'^\s*import\s+(weak\s+)?"gogoproto/gogo\.proto";\s*$', re.M)
_GOGO_OPTION = re.compile(r"^\s*option\s+\(gogoproto\.\w+\)\s*=\s*[^;]+;\s*$", re.M)
_ONE = r"\(gogoproto\.\w+\)\s*=\s*[^,\]]+"
_GOGO_FIELD_OPTIONS = re.compile(rf"\s*\[\s*{_ONE}(\s*,\s*{_ONE})*\s*\]")


def strip_gogo(text: str) -> str:
    """The proto without gogoproto's import and options, imports rewritten to PACKAGE."""
    text = _GOGO_IMPORT.sub("", text)
    text = _GOGO_OPTION.sub("", text)
    text = _GOGO_FIELD_OPTIONS.sub("", text)
    text = text.replace(f'import "{_IMPORT_FROM}', f'import "{PACKAGE}/containerd/')
    if "gogoproto" in text:
        raise SystemExit("protogen: a gogoproto construct was left unstripped; update plugin_api/protogen.py")
    return text


def generate(source: Path, build: Path, out: Path) -> None:
    from grpc_tools import protoc  # build-time only

    shutil.rmtree(build, ignore_errors=True)
    shutil.rmtree(out / PACKAGE, ignore_errors=True)
    protos = []
    for src, dst in FILES:
        origin = source / src
        if not origin.is_file():
            raise SystemExit(f"protogen: {origin} missing: apt-get install "
                             "golang-github-containerd-containerd-dev")
        target = build / PACKAGE / dst
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(strip_gogo(origin.read_text()))
        protos.append(str(target.relative_to(build)))
    includes = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    argv = ["protoc", f"-I{build}", f"-I{includes}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(argv) != 0:
        raise SystemExit("protogen: protoc failed")
    package = out / PACKAGE
    for d in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plugin_api.protogen", description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    p.add_argument("--source", type=Path, default=GOCODE,
                   help="containerd's api directory (default %(default)s)")
    p.add_argument("--build", type=Path, default=root / "build" / "proto", help="scratch directory")
    p.add_argument("--out", type=Path, default=root, help="where plugin_api/_proto goes (the source tree)")
    args = p.parse_args(argv)
    generate(args.source, args.build, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
