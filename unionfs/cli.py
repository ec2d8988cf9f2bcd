"""`strata-unionfs`: the mount program, with fuse-overlayfs's command line.

    strata-unionfs [-f] [-d] -o lowerdir=A:B[,upperdir=U,workdir=W][,OPTS] MOUNTPOINT
    strata-unionfs SOURCE MOUNTPOINT -o OPTS        (as mount.fuse3 calls it)
    strata-unionfs --version

It exits 0 only once the mount is live (the daemon goes on in the
background), and otherwise non-zero with one line on stderr, which podman
quotes to its user. Unmount with `fusermount3 -u MNT` or `umount MNT`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

import pyfuse3
import trio

from common import daemon, kernel
from common.errors import StrataError

from . import options
from .fs import UnionFS

PROG = "strata-unionfs"
VERSION = "0.1.0"
# fuse-overlayfs reports its version this way; podman only checks that it runs.
VERSION_TEXT = f"{PROG} version {VERSION}\nFUSE library version {pyfuse3.__version__} (pyfuse3)"

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise StrataError(message)


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """Built once: 1.6 ms, a tenth of a mount through the mount service, which builds
    it before its first request."""
    p = _Parser(prog=PROG, description="A copy-on-write union filesystem with the semantics and "
                "on-disk format of overlayfs, on FUSE; a drop-in for fuse-overlayfs.",
                epilog=f"Options (-o): {options.help_text()}. lowerdir= is leftmost on top; without "
                "upperdir= and workdir= (on one filesystem) the mount is read-only. README.md's option "
                "table says what each does.")
    p.add_argument("source_or_mountpoint", nargs="?", help="MOUNTPOINT, or SOURCE when two are given")
    p.add_argument("mountpoint", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("-o", dest="opts", action="append", default=[], metavar="OPTIONS",
                   help="comma-separated mount options (may repeat)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="debug output (implies -f)")
    p.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    return p


def fuse_options(opts: options.MountOptions) -> set[str]:
    flags = set(opts.kernel_flags)
    if "nodev" not in flags:
        flags.add("dev")
    if "nosuid" not in flags:
        flags.add("suid")
    if opts.readonly or opts.upperdir is None:
        flags.discard("rw")
        flags.add("ro")
    # allow_other: container processes run as any uid; default_permissions: the
    # kernel checks modes against the attributes we report.
    return flags | {f"fsname={opts.fsname}", f"subtype={PROG}", "default_permissions", "allow_other"}


def _serve(ops: UnionFS, mountpoint: str) -> None:
    """Serve requests until the mount goes away or a signal ends it (read-ahead is
    raised beside the loop once the kernel's INIT is answered).

    Handlers run inline in the request loop (our pyfuse3 patch, main_inline):
    a request that makes a few system calls is answered before the next one
    is read, without the cost of a trio task per request (about a third of
    every request with pyfuse3's main()); a long one (copy-up of a big file,
    fsync) detaches into a trio task of its own and the loop goes
    on. The loop polls for spin= microseconds after each reply before it
    sleeps: on this kind of VM a sleeping thread takes ~100 us to wake, as
    long as the whole round trip of a lookup, so a stream of requests pays it
    no more."""
    def stop(signum: int, frame: FrameType | None) -> None:
        pyfuse3.terminate()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    threading.Thread(target=_set_readahead, args=(mountpoint,), daemon=True).start()
    # Everything alive now (modules, trio, the layer stack) lives as long as the mount:
    # out of the collector's sight, its full collections stop rescanning them.
    gc.freeze()
    try:
        trio.run(pyfuse3.main_inline, ops.opts.spin_us)
    finally:
        # First let go of every layer: the kernel does not wait for a FUSE daemon at
        # unmount, and whoever unmounts a layer's own filesystem right after ours
        # (as unionmount-testsuite does) must not find it busy.
        ops.close()
        pyfuse3.close(unmount=True)


def _mount(ops_opts: options.MountOptions, mountpoint: str, debug: bool) -> UnionFS:
    ops = UnionFS(ops_opts)
    # Layers handed over as inherited descriptors (/proc/self/fd/N, as clone volumes
    # pass them) are open now in their own right: the inherited fds would only keep
    # the callers' filesystems busy.
    for path in (*ops_opts.lowerdirs, ops_opts.upperdir, ops_opts.workdir):
        fd = path.removeprefix("/proc/self/fd/") if path else ""
        if fd.isdigit() and int(fd) > 2:
            with contextlib.suppress(OSError):
                os.close(int(fd))
    fopts = fuse_options(ops_opts)
    if debug:
        fopts.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, fopts)
    except RuntimeError as e:
        raise StrataError(f"cannot mount on {mountpoint}: {e}") from None
    return ops


# The largest read the connection takes (libfuse asks for 256-page requests).
READAHEAD_KIB = 1024


def _set_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead a whole request, not its 128 KiB default for a
    FUSE mount: cold sequential read of a 256 MiB lower file 0.21 s -> 0.13 s
    (medians of 5 here). Runs beside the loop: the kernel sets read-ahead from
    the reply to INIT, so the setting must come after it, and the stat waits
    for that. Best effort: without write access to sysfs the mount works as it is."""
    log = logging.getLogger(__name__)
    dev = kernel.mount_device(mountpoint)
    if dev is None:
        log.debug("read-ahead left at the default: %s not in mountinfo", mountpoint)
        return
    try:
        os.stat(mountpoint)
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(READAHEAD_KIB))
    except OSError as e:
        log.debug("read-ahead left at the default: %s", e)


def _raise_fd_limit() -> None:
    """The daemon holds an fd for each open file of the container and a cache of
    directory fds: take the whole of the hard limit (podman and containerd may
    start it with a soft limit of 1,024), as fuse-overlayfs does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _prepare(argv: Sequence[str]) -> tuple[argparse.Namespace, options.MountOptions, str] | None:
    """The command line checked (StrataError with the one-line reason if not);
    None once --version is printed."""
    args = _parser().parse_args(argv)
    if args.version:
        print(VERSION_TEXT)
        return None
    mountpoint = args.mountpoint or args.source_or_mountpoint
    if mountpoint is None:
        raise StrataError("no mountpoint given")
    if not hasattr(pyfuse3, "main_inline"):
        raise StrataError("this pyfuse3 lacks strata's patch (unionfs/pyfuse3.patch); "
                          "install with `make install`")
    opts = options.parse(args.opts)
    if args.mountpoint and args.source_or_mountpoint and opts.fsname == "strata-unionfs":
        opts.fsname = args.source_or_mountpoint
    options.check_dirs(opts, mountpoint)
    os.umask(0)
    _raise_fd_limit()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    return args, opts, os.path.abspath(mountpoint)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        prepared = _prepare(argv)
    except StrataError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    if prepared is None:
        return 0
    args, opts, mountpoint = prepared
    if args.foreground or args.debug:
        try:
            ops = _mount(opts, mountpoint, args.debug)
        except (StrataError, OSError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        _serve(ops, mountpoint)
        return 0
    return _daemonize(opts, mountpoint, argv)


def _daemonize(opts: options.MountOptions, mountpoint: str, argv: Sequence[str]) -> int:
    """Mount in a daemon (common.daemon): exit 0 once the mount is in place, as
    fuse-overlayfs does (the kernel holds every request until the daemon has
    answered its INIT), else 1 with the daemon's reason."""

    def serve(notify: daemon.Notifier) -> int:
        daemon.set_title([PROG, *argv])  # started as `python -m unionfs.cli`, shown as the command
        ops = _mount(opts, mountpoint, False)  # before quiet(): libfuse's complaints reach the caller
        daemon.quiet()
        notify.ready()
        _serve(ops, mountpoint)
        return 0

    try:
        daemon.daemonize(serve, name="mount daemon")
    except StrataError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    return 0


def warm_up() -> None:
    """What the mount service does once, before its first request."""
    _parser()


def serve_request(argv: Sequence[str], report: Callable[[int], None]) -> None:
    """The mount command run in a process the mount service forked for it, which
    becomes the mount's daemon (one fork less than main()): report(status) once
    the mount is in place, or after the reason went to stderr; then serve until
    unmounted. Shown as `strata-unionfs ARGS` in ps, as main()'s daemon."""
    try:
        prepared = _prepare(argv)
        if prepared is None:
            report(0)
            return
        _, opts, mountpoint = prepared
        daemon.set_title([PROG, *argv])
        ops = _mount(opts, mountpoint, False)
    except (StrataError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.stderr.flush()
        report(1)
        return
    daemon.quiet()
    report(0)
    _serve(ops, mountpoint)


def run() -> None:
    """main() as a program: exit without interpreter teardown (~15 ms of every mount)."""
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
