"""Hosts of their own for benchmarks: network namespaces joined by veth pairs.

A :class:`Hosts` makes namespaces named ``bfnet<pid>-<name>``, links them with
veth pairs on 10.250.x.y/30 addresses, optionally shapes a link with ``tc ...
tbf``, and runs this interpreter inside them, each process with its own IPC
namespace and an empty ``/dev/shm`` (as on another machine: a client there
cannot map the server's shared memory). :meth:`Hosts.close` (also on leaving the
``with`` block, on an exception, Ctrl-C or SIGTERM) stops every process and
deletes every namespace, which takes its veth ends and its ``/dev/shm`` with
it. Namespaces left by a run that was killed outright are removed by the next.
Traffic stays between the namespaces made here.

:func:`unavailable` says why hosts cannot be made here (not root, no ``ip``,
``unshare`` or ``tc``, no namespaces), or None.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count
from types import FrameType, TracebackType
from typing import Any

from batchferry.cleanup import process_alive

__all__ = ["PREFIX", "Hosts", "sigterm_unwinds", "unavailable"]

PREFIX = "bfnet"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _remove_stale() -> None:
    """Namespaces of earlier runs whose process is gone (killed before it could clean up)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if match and not process_alive(int(match.group(2))):
            _ip("netns", "del", match.group(1), check=False)


def unavailable() -> str | None:
    """Why namespaces with their own /dev/shm cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    missing = [tool for tool in ("ip", "unshare", "tc") if shutil.which(tool) is None]
    if missing:
        return f"network namespaces need {', '.join(missing)} (iproute2, util-linux)"
    with Hosts() as hosts:
        try:
            ns = hosts.host("probe")
        except subprocess.CalledProcessError as exc:
            return f"cannot make a network namespace: {' '.join(exc.cmd)}: {exc.stderr.strip()}"
        probe = subprocess.run(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--ipc", "sh", "-c",
             "mount -t tmpfs tmpfs /dev/shm"],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if probe.returncode != 0:
            return f"cannot give a process its own /dev/shm in a namespace: {probe.stderr.strip()}"
    return None


class Hosts:
    """Namespaces, veth links and processes; :meth:`close` removes them all."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []
        self._links = count()
        self._closed = False
        _remove_stale()

    def host(self, name: str) -> str:
        """A new namespace with its loopback up; returns its name."""
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str, b: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """A veth pair between namespaces a and b: ((device, address) in a, (device, address) in b)."""
        n = next(self._links)
        subnet = f"10.250.{os.getpid() % 64 * 4 + n % 4}"
        dev_a, dev_b = f"{self.tag}v{n}a", f"{self.tag}v{n}b"
        _ip("link", "add", dev_a, "netns", a, "type", "veth", "peer", "name", dev_b, "netns", b)
        for ns, dev, host in ((a, dev_a, 1), (b, dev_b, 2)):
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        return (dev_a, f"{subnet}.1"), (dev_b, f"{subnet}.2")

    def shape(self, ns: str, dev: str, bits_per_s: float | None) -> None:
        """Limit what ``dev`` sends to ``bits_per_s`` with a token bucket (None: no limit)."""
        if bits_per_s is None:
            subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                check=False, capture_output=True, timeout=30,
            )  # fmt: skip
            return
        # The bucket holds a few timer ticks' worth of bytes, so the rate holds at
        # coarse timer resolution without letting long bursts through.
        burst = max(1 << 20, int(bits_per_s / 8 / 250))
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
             "rate", f"{int(bits_per_s)}bit", "burst", str(burst), "latency", "20ms"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip

    def run(self, ns: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
        """This interpreter with ``args`` in ``ns``, with its own IPC namespace and an empty /dev/shm."""
        popen.setdefault("stdout", subprocess.PIPE)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--mount", "--ipc", "sh", "-c",
             'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh", sys.executable, *args],
            text=True, **popen,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        self.procs = []
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)  # its veth ends and /dev/shm mounts go with it
        self.namespaces = []

    def __enter__(self) -> Hosts:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit, so that ``finally`` clauses (and close()) run."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
