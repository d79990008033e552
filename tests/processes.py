"""Processes the tests start and watch: ``batchferry serve`` on a free port, receivers, polling."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import psutil


def receivers_running() -> list[psutil.Process]:
    """Receiver processes (``receive_processes=True``) of any loader on this machine."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "batchferry.relay.child" in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``batchferry serve`` as a real process on a fixed address: killable and restartable."""

    def __init__(
        self, dataset: str, *, host: str = "127.0.0.1", port: int | None = None, extra: Sequence[str] = ()
    ) -> None:
        self.dataset, self.host, self.extra = dataset, host, list(extra)
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[str] | None = None
        self.banner = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchferry.cli", "--log-level", "WARNING", "serve",
             "--dataset", self.dataset, "--host", self.host, "--port", str(self.port),
             "--num-workers", "1", *self.extra],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()
        assert "serving" in self.banner, self.banner

    def kill(self) -> None:
        """kill -9: no clean-up, as when a machine dies."""
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.proc = None


@contextlib.contextmanager
def serving(dataset: str, extra: Sequence[str] = ()) -> Iterator[ServeProcess]:
    """A started :class:`ServeProcess`, stopped after, with what a kill of it left removed."""
    from batchferry import shm

    server = ServeProcess(dataset, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shm.remove_stale()


@contextlib.contextmanager
def back_after(delay: float, start: Callable[[], object]) -> Iterator[None]:
    """``start()`` (a server's, a storage server's) ``delay`` seconds from now, in a thread
    joined on the way out, also when the block fails: no process outlives its test."""
    timer = threading.Timer(delay, start)
    timer.start()
    try:
        yield
    finally:
        timer.join()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes (tests never sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)
