"""No shared memory or process outlives a server: close, signals, kill -9, and other PID namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from batchferry import shm
from batchferry.client import DataLoader
from batchferry.server import Server

from checks import no_new_segments, own_segments
from processes import wait_until


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


def _fake_owner(token: str, *, alive: bool) -> tuple[list[Path], int | None]:
    """Segments of a token whose owner file is locked (a live owner) or not (a dead one)."""
    owner = shm.SHM_DIR / f"{shm.PREFIX}{token}.owner"
    owner.write_text("1\n")
    fd = None
    if alive:
        import fcntl

        fd = os.open(owner, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
    paths = [owner]
    for n in range(3):
        path = shm.SHM_DIR / f"{shm.PREFIX}{token}_{n}"
        path.write_bytes(b"x" * 100)
        paths.append(path)
    return paths, fd


def test_stale_segments_are_those_whose_owner_lock_is_free(tensor_ds) -> None:
    dead, _ = _fake_owner("dead" * 4, alive=False)
    live, fd = _fake_owner("a11fe" + "0" * 11, alive=True)
    try:
        with Server({"t": tensor_ds}, port=0, num_workers=0):
            assert not any(p.exists() for p in dead)
            assert all(p.exists() for p in live)  # its owner holds the lock, whatever its pid
    finally:
        assert fd is not None
        os.close(fd)
        for p in live:
            p.unlink()


def test_a_server_in_another_pid_namespace_keeps_our_segments(tensor_ds) -> None:
    """Containers sharing /dev/shm (ipc: service:server) see other process ids: liveness is a lock."""
    script = textwrap.dedent(
        """
        from batchferry.server import Server
        with Server({"s": "synthetic:n=8,shape=2"}, port=0, num_workers=0) as srv:
            print("started", flush=True)
        """
    )
    with Server({"t": tensor_ds}, port=0, num_workers=0) as srv:
        names = srv.segment_names()
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", script]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            pytest.skip("unshare is not installed")
        if out.returncode != 0 and "unshare failed" in out.stderr:
            pytest.skip(f"cannot create a PID namespace here: {out.stderr.strip()}")
        assert out.returncode == 0 and "started" in out.stdout, out.stderr
        assert all((shm.SHM_DIR / n).exists() for n in names)
        with DataLoader(srv.address, "t", 10, transport="shm") as loader:
            assert len(list(loader)) == 11


def _workers(proc: psutil.Process) -> list[psutil.Process]:
    """Worker processes (the stdlib's shared resource tracker lives as long as its parent)."""
    return [p for p in proc.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]


def _reaper(proc: psutil.Process) -> psutil.Process:
    return next(p for p in proc.children() if "-c" in p.cmdline() and "batchferry_" in " ".join(p.cmdline()))


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``batchferry serve`` as a real process, as the container runs it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchferry.cli", "--log-level", "WARNING", "serve",
         "--dataset", "syn=synthetic:n=512,shape=16", "--host", "127.0.0.1", "--port", "0",
         "--num-workers", "2"],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
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
        shm.remove_stale()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cli_server_cleanly(
    cli_server: tuple[subprocess.Popen[str], str], sig: signal.Signals
) -> None:
    proc, address = cli_server
    with DataLoader(address, "syn", 64) as loader:
        assert len(list(loader)) == 8
    workers = _workers(psutil.Process(proc.pid))
    assert own_segments(proc.pid)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    assert not own_segments(proc.pid)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_kill_9_of_a_server_leaves_no_segment(cli_server: tuple[subprocess.Popen[str], str]) -> None:
    proc, address = cli_server
    workers = _workers(psutil.Process(proc.pid))
    with DataLoader(address, "syn", 64, transport="shm") as loader:
        next(iter(loader))
        assert own_segments(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not own_segments(proc.pid), 10)  # its reaper unlinked them
    _, alive = psutil.wait_procs(workers, timeout=15)  # and its workers noticed and exited
    assert not alive


def test_kill_9_of_server_and_reaper_is_cleaned_at_the_next_start(
    cli_server: tuple[subprocess.Popen[str], str], tensor_ds
) -> None:
    proc, _ = cli_server
    reaper = _reaper(psutil.Process(proc.pid))
    reaper.kill()  # e.g. the whole process group killed at once
    proc.kill()
    proc.wait(timeout=10)
    assert own_segments(proc.pid)  # nobody was left to clean up ...
    with Server({"t": tensor_ds}, port=0, num_workers=0):
        assert not own_segments(proc.pid)  # ... until the next server starts


def test_wait_turns_sigterm_into_close_for_python_servers(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from batchferry.server import Server
        if __name__ == "__main__":
            with Server({"s": "synthetic:n=64,shape=4"}, port=0, num_workers=1) as srv:
                print(srv.address, flush=True)
                srv.wait()
            print("closed", flush=True)
        """
    )
    path = tmp_path / "serve.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    try:
        with DataLoader(address, "s", 8, transport="shm") as loader:
            assert len(list(loader)) == 8
        assert own_segments(proc.pid)
        workers = _workers(psutil.Process(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read().strip() == "closed"
        assert not own_segments(proc.pid)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


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
