"""What a hostile container tries (issue 11's reproductions and the parity list), as one
shell script run in a busybox container: each probe is a command whose success means
the container could do it. The same script runs in `strata run` and `docker run`."""

from __future__ import annotations

from collections.abc import Callable

from tests.runtime.conftest import Loop


def probes(loop: Loop) -> list[tuple[str, str]]:
    """(name, command). Those that open something for writing write nothing: a success
    must not touch the host; a block write lands in the test's own loop file."""
    return [
        ("mknod a block device", f"mknod /tmp/hd b {loop.major} {loop.minor}"),
        ("read a raw block device", f"dd if=/tmp/hd bs=512 count=1 2>/dev/null | grep -q {loop.marker}"),
        ("write a raw block device", "dd if=/dev/zero of=/tmp/hd bs=512 count=1 seek=4096 conv=notrunc"),
        ("open /dev/mem (mknod c 1 1)", "mknod /tmp/mem c 1 1 && : < /tmp/mem"),
        ("unshare -U -r id", "unshare -U -r id"),
        ("read /proc/keys", 'test -n "$(head -2 /proc/keys)"'),
        ("read /proc/timer_list", 'test -n "$(head -2 /proc/timer_list)"'),
        ("read /proc/kcore", 'test "$(head -c 4 /proc/kcore | wc -c)" -gt 0'),
        ("list /sys/firmware", 'test -n "$(ls /sys/firmware)"'),
        ("keyctl(2)", "cp /probe/keyctl /tmp/k && chmod +x /tmp/k && /tmp/k"),
        ("mount a tmpfs", "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m"),
        ("open /proc/sysrq-trigger to write", ": >> /proc/sysrq-trigger"),
        ("open /proc/sys/vm/drop_caches to write", ": >> /proc/sys/vm/drop_caches"),
        ("open /sys/kernel/profiling to write", ": >> /sys/kernel/profiling"),
    ]


def script(loop: Loop) -> str:
    return "".join(f'if ( {cmd} ) >/dev/null 2>&1; then echo "P{i} allowed"; else echo "P{i} blocked"; fi\n'
                   for i, (_, cmd) in enumerate(probes(loop)))


def run(loop: Loop, runner: Callable[[str], str]) -> dict[str, bool]:
    """{probe name: allowed} from runner(script) -> the container's stdout."""
    out = dict(line.split(" ", 1) for line in runner(script(loop)).splitlines() if line.startswith("P"))
    names = [name for name, _ in probes(loop)]
    assert len(out) == len(names), f"probe output incomplete: {out}"
    return {name: out[f"P{i}"] == "allowed" for i, name in enumerate(names)}
