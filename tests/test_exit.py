"""Training scripts end promptly whatever they do with a loader: break, del, return, Ctrl-C, no close()."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from batchferry import shm

from processes import ServeProcess, receivers_running, wait_until

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from batchferry.client import DataLoader

    address, transport, pattern = sys.argv[1:4]

    def make():
        kind, _, receivers = transport.partition("+")  # "grpc+receivers": receive_processes=True
        return DataLoader(
            address, "syn", 16, shuffle=True, seed=0, transport=kind, receive_processes=bool(receivers)
        )

    def leave_early(loader):
        for i, batch in enumerate(loader):
            if i == 3:
                break

    if __name__ == "__main__":
        if pattern == "embedded":
            from batchferry.server import Server
            server = Server({"syn": "synthetic:n=4096,shape=16"}, port=0, num_workers=1)
            address = server.address
        if pattern in ("break", "embedded"):
            loader = make()
            for i, batch in enumerate(loader):  # a global loader and batch, never closed
                if i == 3:
                    break
        elif pattern == "del":
            loader = make()
            leave_early(loader)
            del loader
        elif pattern == "return":
            leave_early(make())
        elif pattern == "sigint":
            loader = make()
            print("iterating", flush=True)
            try:
                for epoch in range(10**6):
                    for batch in loader:
                        time.sleep(0.001)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                raise
        print("end of script", flush=True)
    """
)


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    server = ServeProcess("syn=synthetic:n=4096,shape=16")
    server.start()
    try:
        yield server.address
    finally:
        server.stop()


@contextmanager
def _run(tmp_path: Path, address: str, transport: str, pattern: str) -> Iterator[subprocess.Popen[str]]:
    """The training script as a process; killed at the end if a failed check left it running."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), address, transport, pattern],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _gone_within(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    """Its exit code and stderr; fails if it is still running ``seconds`` from now."""
    try:
        _, err = proc.communicate(timeout=seconds)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"process still running {seconds}s later; stderr: {err[-2000:]}")


@pytest.mark.parametrize("transport", ["grpc", "shm", "grpc+receivers"])
@pytest.mark.parametrize("pattern", ["break", "del", "return"])
def test_script_that_leaves_an_epoch_early_exits(
    served: str, tmp_path: Path, transport: str, pattern: str
) -> None:
    with _run(tmp_path, served, transport, pattern) as proc:
        assert _line(proc, 60) == "end of script"
        code, err = _gone_within(proc, 10)
    assert code == 0, err
    assert not shm.stale()
    assert wait_until(lambda: not receivers_running(), 10)


def test_script_with_an_embedded_server_and_no_close_exits(tmp_path: Path) -> None:
    with _run(tmp_path, "", "auto", "embedded") as proc:
        assert _line(proc, 60) == "end of script"
        code, err = _gone_within(proc, 15)
    assert code == 0, err
    assert not shm.owned_by(proc.pid)  # the server was closed at exit


@pytest.mark.parametrize("transport", ["grpc", "shm", "grpc+receivers"])
def test_ctrl_c_interrupts_a_training_loop_promptly(served: str, tmp_path: Path, transport: str) -> None:
    with _run(tmp_path, served, transport, "sigint") as proc:
        assert _line(proc, 60) == "iterating"
        time.sleep(0.3)  # let it get into the loop (not synchronisation: any moment will do)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert _line(proc, 5) == "interrupted"
        interrupted = time.monotonic() - sent
        code, err = _gone_within(proc, 10)
    assert interrupted < 2.0, f"KeyboardInterrupt took {interrupted:.2f}s"
    assert code != 0 and "KeyboardInterrupt" in err
    assert wait_until(lambda: not receivers_running(), 10)


def test_kill_9_of_a_loader_ends_its_receivers(served: str, tmp_path: Path) -> None:
    with _run(tmp_path, served, "grpc+receivers", "sigint") as proc:
        assert _line(proc, 60) == "iterating"
        assert wait_until(lambda: len(receivers_running()) == 2, 30)  # its two stripes
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not receivers_running(), 10)
    assert wait_until(lambda: not shm.stale(), 10)
