"""HOSTILE: the budgets and fairness hold while careless or hostile clients run.

``batchferry bench HOSTILE`` starts one ``batchferry serve`` on W2 (38.5 MB batches)
with a 1 GiB shared-memory budget, then measures, in the same run:

* **open/cancel loop**: clients that open a same-host stream and cancel it at once,
  200 times; the server's peak shared memory (sampled from /dev/shm) against the budget;
* **8 slot-holding clients**: raw same-host clients that take every batch and release
  none; a well-behaved DataLoader's time for 16 W2 batches meanwhile, against the same
  loader on the idle server (the ratio is reported; 2x or less is the target), and
  next to it the loader's worst wait for one batch (from opening its stream: the
  first batch's wait includes the wait for a first slot, docs/hoarding.md);
* **8 well-behaved readers** in their place, reading as fast as they can: the slowdown
  any 8 busy clients cause by sharing the workers and the server, which the hoarders'
  slowdown is measured against (hoarding should cost others no more than reading).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import multiprocessing
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from batchferry import shm, wire
from batchferry.client import DataLoader
from batchferry.v1 import loader_pb2 as _pb2

from .harness import machine, save_report, served
from .workloads import WORKLOADS

BUDGET = 1 << 30
HOSTILE_CLIENTS = 8
BATCHES = 16
_SETTLE_S = 8.0  # for the other clients' processes to start and fill what they can


def _server_shm(pid: int) -> int:
    total = 0
    for name in shm.owned_by(pid):
        with contextlib.suppress(FileNotFoundError):
            total += (shm.SHM_DIR / name).stat().st_size
    return total


class _Sampler:
    """The server's /dev/shm bytes, sampled every 10 ms on a thread; ``peak`` after stop()."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _server_shm(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.peak


def _open(credits: int) -> bytes:
    return _pb2.ClientMessage(
        open=_pb2.OpenStream(dataset="W2", batch_size=256, credits=credits, transport=_pb2.TRANSPORT_SHM)
    ).SerializeToString()


def _open_cancel(address: str, times: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream(wire.STREAM_BATCHES)
        for _ in range(times):
            call = stream(iter([_open(8)]), timeout=30)
            with contextlib.suppress(grpc.RpcError, StopIteration):
                next(call)  # the start frame: builds are under way
            call.cancel()


def _hoarder(address: str, stop: Any) -> None:
    """Takes every batch it can (a credit for each) and never releases a slot."""
    credit = _pb2.ClientMessage(credit=_pb2.Credit(batches=1)).SerializeToString()
    more = threading.Semaphore(0)

    def requests() -> Iterator[bytes]:
        yield _open(4)
        while not stop.is_set():
            if more.acquire(timeout=0.1):
                yield credit

    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES)(requests(), timeout=600)
        chunks = 0
        with contextlib.suppress(grpc.RpcError):
            for raw in call:
                if stop.is_set():
                    call.cancel()
                    break
                if chunks:
                    chunks -= 1
                    continue
                frame = _pb2.ServerFrame.FromString(raw)
                if frame.WhichOneof("kind") == "batch":
                    chunks = frame.batch.num_chunks
                    more.release()


def _reader(address: str, stop: Any) -> None:
    """A well-behaved loader reading as fast as it can until ``stop``."""
    with DataLoader(address, "W2", 256, shuffle=True, seed=1, transport="shm") as loader:
        while not stop.is_set():
            for _ in loader:
                if stop.is_set():
                    break


def _busy(address: str, server_pid: int, client: Any, reps: int) -> tuple[list[tuple[float, float]], int]:
    """The well-behaved loader's (time, worst wait) while 8 ``client`` processes run, and
    the server's peak shared memory meanwhile."""
    # Processes of their own, as other trainers are: threads here would compete with the
    # measured loader for this process's interpreter lock, not for the server.
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    others = [ctx.Process(target=client, args=(address, stop)) for _ in range(HOSTILE_CLIENTS)]
    sampler = _Sampler(server_pid)
    for proc in others:
        proc.start()
    try:
        time.sleep(_SETTLE_S)  # they start, then take what they can
        times = [_well_behaved(address) for _ in range(reps)]
    finally:
        stop.set()
        for proc in others:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return times, sampler.stop()


def _well_behaved(address: str) -> tuple[float, float]:
    """Seconds for BATCHES batches after the first, and the longest wait for any one batch
    (the first included: its stream's wait for a first slot)."""
    with DataLoader(address, "W2", 256, shuffle=True, seed=0, transport="shm") as loader:
        opened = time.perf_counter()
        it = iter(loader)
        next(it)
        start = last = time.perf_counter()
        worst = start - opened
        for _ in range(BATCHES):
            x = next(it)[0]
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
            x[:, :, 0, 0].float().mean()
            del x
        return time.perf_counter() - start, worst


def main(*, out: Path, reps: int = 3) -> dict[str, Any]:
    workload = WORKLOADS["W2"]
    report: dict[str, Any] = {
        "workload": "HOSTILE",
        "date": _dt.date.today().isoformat(),
        "machine": machine(),
        "shm_budget": BUDGET,
    }
    with served(workload, 2, ["--shm-bytes", str(BUDGET)]) as address:
        server = next(p for p in psutil.Process().children() if "serve" in " ".join(p.cmdline()))
        idle = [_well_behaved(address) for _ in range(reps)]
        sampler = _Sampler(server.pid)
        _open_cancel(address, 200)
        report["open_cancel_peak_shm"] = sampler.stop()
        busy, report["hoarders_peak_shm"] = _busy(address, server.pid, _hoarder, reps)
        readers, report["readers_peak_shm"] = _busy(address, server.pid, _reader, reps)
    report["idle_s"] = statistics.median(t for t, _ in idle)
    report["with_hoarders_s"] = statistics.median(t for t, _ in busy)
    report["with_readers_s"] = statistics.median(t for t, _ in readers)
    # The victim's worst wait for one batch, over every repetition.
    report["idle_worst_wait_s"] = max(w for _, w in idle)
    report["with_hoarders_worst_wait_s"] = max(w for _, w in busy)
    report["with_readers_worst_wait_s"] = max(w for _, w in readers)
    report["slowdown"] = report["with_hoarders_s"] / report["idle_s"]
    report["slowdown_readers"] = report["with_readers_s"] / report["idle_s"]
    print(
        f"open/cancel x200: peak shared memory {report['open_cancel_peak_shm'] / 2**20:.0f} MiB "
        f"(budget {BUDGET / 2**20:.0f} MiB)\n"
        f"{HOSTILE_CLIENTS} slot-holding clients: peak {report['hoarders_peak_shm'] / 2**20:.0f} MiB; "
        f"a well-behaved loader's {BATCHES} W2 batches took {report['with_hoarders_s']:.2f}s vs "
        f"{report['idle_s']:.2f}s idle ({report['slowdown']:.2f}x); worst wait for a batch "
        f"{report['with_hoarders_worst_wait_s']:.2f}s vs {report['idle_worst_wait_s']:.2f}s idle\n"
        f"{HOSTILE_CLIENTS} well-behaved readers instead: peak {report['readers_peak_shm'] / 2**20:.0f} MiB; "
        f"{report['with_readers_s']:.2f}s ({report['slowdown_readers']:.2f}x idle, worst wait "
        f"{report['with_readers_worst_wait_s']:.2f}s); hoarding costs others "
        f"{report['slowdown'] / report['slowdown_readers']:.2f}x what reading does"
    )
    save_report(report, out, "HOSTILE")
    return report
