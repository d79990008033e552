"""No shared memory or process outlives a server: close, SIGTERM, and after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from batchferry import shm
from batchferry.client import DataLoader
from batchferry.server import Server

from support import leaked_segments, no_new_segments


def test_close_unlinks_segments_and_stops_workers(tensor_ds) -> None:
    with no_new_segments():
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        srv = Server({"t": tensor_ds}, port=0, num_workers=2)
        names = srv.segment_names()
        children = [p for p in _workers(psutil.Process()) if p.pid not in before]
        assert len(children) == 2
        assert names and all((shm.SHM_DIR / n).exists() for n in names)
        with DataLoader(srv.address, "t", 10) as loader:
            list(loader)
        srv.close()
        srv.close()  # idempotent
        assert not any((shm.SHM_DIR / n).exists() for n in names)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive


def test_stale_segments_of_dead_owners_are_removed(tensor_ds) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = shm.SHM_DIR / f"{shm.PREFIX}{dead.pid}_deadbeef_1"
    stale.write_bytes(b"x" * 100)
    mine = shm.Segment.create(shm.new_name("cafe0001", 1), 4096)  # owner alive: kept
    try:
        with Server({"t": tensor_ds}, port=0, num_workers=0):
            assert not stale.exists()
            assert (shm.SHM_DIR / mine.name).exists()
    finally:
        mine.close()


def _workers(proc: psutil.Process) -> list[psutil.Process]:
    """Worker processes (the stdlib's shared resource tracker lives as long as its parent)."""
    return [p for p in proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``batchferry serve`` as a real process, as the container runs it."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "batchferry.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--dataset",
            "syn=synthetic:n=512,shape=16",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--num-workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert "serving syn on" in line, line
        yield proc, line.rsplit(" ", 1)[-1].strip()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def _segments_of(pid: int) -> list[str]:
    return [n for n in leaked_segments() if n.startswith(f"{shm.PREFIX}{pid}_")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cli_server_cleanly(
    cli_server: tuple[subprocess.Popen[str], str], sig: signal.Signals
) -> None:
    proc, address = cli_server
    with DataLoader(address, "syn", 64) as loader:
        assert len(list(loader)) == 8
    workers = _workers(psutil.Process(proc.pid))
    assert _segments_of(proc.pid)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert not _segments_of(proc.pid)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_kill_9_leaves_nothing_after_next_start(
    cli_server: tuple[subprocess.Popen[str], str], tensor_ds
) -> None:
    proc, _ = cli_server
    workers = _workers(psutil.Process(proc.pid))
    proc.kill()
    proc.wait(timeout=10)
    assert _segments_of(proc.pid)  # a crash cannot clean up after itself ...
    _, alive = psutil.wait_procs(workers, timeout=15)  # ... but its workers notice and exit
    assert not alive
    with Server({"t": tensor_ds}, port=0, num_workers=0):
        assert not _segments_of(proc.pid)  # ... and the next start removes what it left


def test_worker_processes_exit_when_server_process_dies(
    cli_server: tuple[subprocess.Popen[str], str],
) -> None:
    proc, _ = cli_server
    workers = _workers(psutil.Process(proc.pid))
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    start = time.monotonic()
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"still running after {time.monotonic() - start:.1f}s"
    shm.remove_stale()
