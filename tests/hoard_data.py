"""Loaders that keep every batch (hoarders), for tests/test_hoarding.py.

Hoarders run in processes other than the test's, as other trainers on the host would
(a few loaders to a process, to start quickly). A hoarder
appends every batch it reads to a list (up to ``KEEP`` of them, for the test
machine's memory) and never drops one, with in-place copy-out
made unavailable (as on a platform where the kernel refuses it), so every batch it
keeps stays mapped from the server's shared memory. At the end it checks that every
kept batch still holds its own samples.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import torch
from torch.utils.data import Dataset

from batchferry import shm
from batchferry.client import DataLoader

ROW = 1024  # floats per sample: batches of 64 take 256 KiB
KEEP = 400  # batches a hoarder keeps (then it reads on, holding those): 100 MiB each


class Rows(Dataset[tuple[torch.Tensor, int]]):
    """Sample i is a row of i's (and the label i): any batch can be checked on its own."""

    def __init__(self, n: int = 1024) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((ROW,), float(i)), i


def intact(batch: Any) -> bool:
    """Whether a batch of :class:`Rows` holds, row by row, the samples its labels name."""
    rows, labels = batch
    return bool((rows == labels.to(rows.dtype)[:, None]).all())


def hoard(
    address: str, dataset: str, batch_size: int, loader_kwargs: dict[str, Any], stop: Any, out: Any
) -> None:
    """Read epochs until ``stop``, keeping every batch; put (batches kept, batches not intact
    or the error that ended it)."""
    kept: list[Any] = []
    try:
        with DataLoader(address, dataset, batch_size, transport="shm", timeout=60, **loader_kwargs) as loader:
            while not stop.is_set():
                for batch in loader:
                    if len(kept) < KEEP:
                        kept.append(batch)
                    if stop.is_set():
                        break
        out.put((len(kept), sum(not intact(b) for b in kept)))
    except BaseException as exc:  # the test names it
        out.put((len(kept), f"{type(exc).__name__}: {exc}"))


def _hoarders(
    address: str, dataset: str, batch_size: int, kwargs: list[dict[str, Any]], stop: Any, out: Any
) -> None:
    """Several hoarding loaders in one process, a thread each."""
    shm.privatize = lambda mapping, nbytes: False  # kept batches stay mapped: the worst case
    torch.set_num_threads(1)  # many processes on few cores: torch's spinning threads would crawl
    threads = [
        threading.Thread(target=hoard, args=(address, dataset, batch_size, kw, stop, out)) for kw in kwargs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def start_hoarders(
    address: str, dataset: str, batch_size: int, kwargs: list[dict[str, Any]], processes: int = 2
) -> tuple[Any, Any, list[multiprocessing.process.BaseProcess]]:
    """One hoarding loader per entry of ``kwargs`` (its loader arguments), spread over
    ``processes`` processes: (stop, out, processes)."""
    # Forked from one process that imported torch once: each spawn would import it again.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    stop, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_hoarders, args=(address, dataset, batch_size, kwargs[k::processes], stop, out))
        for k in range(processes)
    ]
    for proc in procs:
        proc.start()
    return stop, out, procs


def stop_hoarders(
    stop: Any, out: Any, procs: list[multiprocessing.process.BaseProcess], loaders: int
) -> list[tuple[int, int | str]]:
    """Stop them; each loader's (batches kept, batches not intact or the error it ended with)."""
    stop.set()
    results = []
    deadline = time.monotonic() + 60
    for _ in range(loaders):
        results.append(out.get(timeout=max(1.0, deadline - time.monotonic())))
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return results
