"""A container process's stdio: its log, the attached terminal, and `Session`, the
one way to start a process in a container and serve it -- the monitor starts the
container's first process with it, exec every other one.

A session gives the process a fresh pty (-t) or pipes as its stdio, then a select
loop (`Pump`) carries its output to the log (docker's json-file format) and, when
attached, to our stdout/stderr, our stdin to it, and our signals to it (docker's
sig-proxy, without a tty: with one, keys are the signals), until it exits."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from runtime import process
from runtime.process import FORWARDED_SIGNALS, exit_code


@dataclass
class Session:
    """A process started in a container with its stdio wired to us."""

    spawned: process.Spawned
    outputs: dict[int, str]  # our ends of its stdout/stderr (one pty master with -t)
    stdin_w: int | None  # our end of its stdin, when it has one we may write
    tty: bool

    @classmethod
    def spawn(cls, spec: process.ProcessSpec, enter: Callable[[], None],
              setup: Callable[[str | None], None] = lambda console: None,
              outside: Callable[[int], None] = lambda pid: None, *, stdin: bool,
              keep_stdin_open: bool = False) -> Session:
        """Start spec's process (process.spawn says what enter, setup and outside do;
        setup gets the name of the process's terminal with -t). stdin: ours will be fed
        to it; keep_stdin_open: it gets a stdin that stays open with nobody writing (a
        detached -i)."""
        stdio, close, outputs, stdin_w = make_stdio(spec.tty, stdin, keep_stdin_open)
        try:
            console = os.ttyname(stdio[0]) if spec.tty else None
            spawned = process.spawn(spec, stdio, enter, lambda: setup(console), outside)
        except BaseException:
            for fd in {*outputs, *([] if stdin_w is None else [stdin_w])}:  # one pty master with -t
                os.close(fd)
            raise
        finally:
            for fd in close:
                os.close(fd)
        return cls(spawned, outputs, stdin_w, spec.tty)

    def serve(self, log: LogWriter | None = None, attached: bool = True, linger: float = 1.0) -> int:
        """Carry its stdio until it exits and its output is drained (or idle for linger
        seconds); returns its exit code."""
        pump = Pump(log=log, attached=attached)
        for fd, stream in self.outputs.items():
            pump.add_output(fd, stream)
        if attached and self.stdin_w is not None:
            pump.add_input(sys.stdin.fileno(), self.stdin_w, close_dst=not self.tty)
        if attached and not self.tty:
            forward_signals(self.spawned.pid)
        with raw_terminal(attached and self.tty):
            return pump.run(self.spawned.helper, linger)


class LogWriter:
    """docker's json-file format, one JSON object per line of output: {"log", "stream",
    "time"}. Bytes that are not UTF-8 survive through surrogate escapes."""

    def __init__(self, path: Path) -> None:
        self.file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed by close()
        self.partial: dict[str, bytes] = {}

    def write(self, stream: str, data: bytes) -> None:
        buf = self.partial.get(stream, b"") + data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            self._emit(stream, line + b"\n")
        self.partial[stream] = rest
        self.file.flush()

    def _emit(self, stream: str, line: bytes) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
        rec = {"log": line.decode(errors="surrogateescape"), "stream": stream, "time": now}
        self.file.write(json.dumps(rec).encode() + b"\n")

    def close(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                self._emit(stream, rest)
        self.partial.clear()
        self.file.close()


def read_log(path: Path, follow: Callable[[], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(stream, bytes) records of a container log; with `follow`, keeps reading while
    follow() says the container still runs."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        pending = b""
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith(b"\n"):
                    rec = json.loads(pending)
                    pending = b""
                    yield rec["stream"], rec["log"].encode(errors="surrogateescape")
                continue
            if follow is None or not follow():
                if follow is not None:  # one last pass: what was written before the exit
                    follow = None
                    continue
                return
            time.sleep(0.1)


@dataclass
class Pump:
    """A select loop carrying a container's output to the log and the attached terminal and
    the terminal's input to it. Other users (port publishing) register their own fds."""

    log: LogWriter | None = None
    attached: bool = False
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    open_outputs: int = 0

    def add_output(self, fd: int, stream: str) -> None:
        os.set_blocking(fd, False)
        self.open_outputs += 1
        target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer

        def on_data(fd: int) -> None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError as e:  # a pty master reads EIO once the last slave closes
                if e.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self.selector.unregister(fd)
                os.close(fd)
                self.open_outputs -= 1
                return
            if self.log is not None:
                self.log.write(stream, data)
            if self.attached:
                with contextlib.suppress(OSError):
                    target.write(data)
                    target.flush()

        self.selector.register(fd, selectors.EVENT_READ, on_data)

    def add_input(self, src: int, dst: int, close_dst: bool) -> None:
        """Copy src (our stdin) to dst (the container's); at EOF close dst unless it is a pty."""

        def on_input(fd: int) -> None:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                self.selector.unregister(fd)
                if close_dst:
                    with contextlib.suppress(OSError):
                        os.close(dst)
                return
            with contextlib.suppress(OSError):
                os.write(dst, data)

        self.selector.register(src, selectors.EVENT_READ, on_input)

    def run(self, helper: int, linger: float = 1.0) -> int:
        """Serve until the helper exits and its output is drained (or lingers idle); returns
        the exit code."""
        pidfd = os.pidfd_open(helper)
        status: list[int] = []

        def on_exit(fd: int) -> None:
            self.selector.unregister(fd)
            os.close(fd)
            status.append(exit_code(os.waitpid(helper, 0)[1]))

        self.selector.register(pidfd, selectors.EVENT_READ, on_exit)
        while not status or self.open_outputs:
            events = self.selector.select(timeout=linger if status else None)
            if not events and status:
                break
            for key, _ in events:
                key.data(key.fd)
        return status[0]


Stdio = tuple[tuple[int, int, int], list[int], dict[int, str], int | None]


def make_stdio(tty_mode: bool, stdin: bool, keep_stdin_open: bool) -> Stdio:
    """The container's stdio: (its three fds, fds to close after spawn, our output fds with
    their stream, our fd writing its stdin)."""
    if tty_mode:
        master, slave = os.openpty()
        if sys.stdin.isatty():
            with contextlib.suppress(OSError):
                size = fcntl.ioctl(sys.stdin.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        writer = master if (stdin or keep_stdin_open) else None
        return (slave, slave, slave), [slave], {master: "stdout"}, writer
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    close = [out_w, err_w]
    if stdin or keep_stdin_open:
        in_r, in_w = os.pipe()
        close.append(in_r)
        stdin_fd, writer = in_r, in_w
    else:
        stdin_fd, writer = os.open(os.devnull, os.O_RDONLY), None
        close.append(stdin_fd)
    return (stdin_fd, out_w, err_w), close, {out_r: "stdout", err_r: "stderr"}, writer


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Our terminal in raw mode while attached to a container's tty (keys go to it as-is)."""
    if not enabled or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def forward_signals(pid: int) -> None:
    """docker's sig-proxy: signals the attached CLI gets go to the container's process."""

    def handler(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, handler)
