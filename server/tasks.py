"""What a worker builds and how: a :class:`Task` (which samples, which collate, which
slot), its :class:`Result` (the Layouts of the batches written into the slot, or why
not), the :class:`TaskRunner` that builds them in one process, and
:func:`worker_main`, a spawned worker's life. :mod:`.workers` owns the processes.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np
import torch

from batchferry import shm
from batchferry.layout import SlotOverflow, SlotWriter, encode

from .collate import CollateFn, SlotCollate, run_collate
from .datasets import DatasetSource, MapDataset
from .failures import for_client, message_of, short_error
from .fetch import Gather, build_batch, gatherer
from .iterators import Exhausted, HostedIterators, IterStep

__all__ = ["Result", "Task", "TaskRunner", "worker_main"]

_PRUNE_EVERY = 0.2  # seconds between drops of mappings of slots the ring replaced
GO = "go"  # on a gated worker's task queue: load the datasets (WorkerPool.start)


@dataclass(frozen=True)
class Task:
    """Build a batch of ``indices`` into a slot; or, with ``sizes``, several consecutive
    batches (``indices`` split into runs of those lengths) one after another in it."""

    dataset: str
    indices: np.ndarray  # int64
    collate: str
    slot_name: str
    slot_bytes: int
    limit: int = 1 << 62  # the largest batch to build (bytes)
    ticket: tuple[int, int] = (0, 0)  # (index, generation) of the stream that wants it
    task_id: int = 0
    sizes: tuple[int, ...] = ()  # batch lengths of a group (empty: one batch)
    unbatched: bool = False  # each batch is one sample, collated by itself (batch_size=None)
    # An IterableDataset stream's step: its batch comes from a hosted iterator (no indices).
    iterable: IterStep | None = None


@dataclass(frozen=True)
class Result:
    """What a task built. ``layouts`` are the serialized Layouts of its batches in the slot:
    all of them when the status is "ok"; otherwise those before the batch that overflowed
    or failed (a group's batches built before one that fails are still good). Status
    "closed": the pool closed before the task was done; "exhausted": the iterator of an
    IterableDataset step had no batch left; "lost": its process died, and the iterator with it."""

    task_id: int
    status: Literal["ok", "overflow", "error", "cancelled", "closed", "exhausted", "lost"]
    layouts: tuple[bytes, ...] = ()
    needed: int = 0  # bytes the batch that overflowed needs, status "overflow"
    error: str = ""  # status "error": the exception's type and a short message
    detail: str = ""  # status "error": the whole traceback, for the server's log
    # Status "error", for the client (see for_client): the exception's class as
    # module.qualname, str() of it, and its traceback (empty when the worker died).
    error_type: str = ""
    error_message: str = ""
    error_trace: str = ""
    gathered: int = 0  # batches built with one gather per field
    seconds: float = 0.0  # the worker's time to fetch, collate and write them
    iterator_state: bytes = b""  # an IterableDataset step: the dataset's state_dict() after it


class TaskRunner:
    """Builds batches for one process: its datasets, collates and mapped slots.

    ``tickets`` holds each open stream's generation: a task whose stream has closed
    since it was queued is skipped, not built for nobody.
    """

    def __init__(
        self,
        sources: dict[str, DatasetSource],
        collates: dict[str, SlotCollate | CollateFn],
        max_segments: int,
        tickets: Any,
    ) -> None:
        self._tickets = tickets
        self._sources = sources
        self._datasets: dict[str, tuple[MapDataset, Gather | None]] = {}
        self._collates = collates
        # A shared lock on each mapped slot: the ring counts a slot it retired until this
        # process lets go of it too (pruned below), so the budget covers this memory.
        self._mappings = shm.Mappings(max_segments, shared_lock=True)
        self._iterators = HostedIterators()
        self._pruned = time.monotonic()

    def dataset(self, name: str) -> tuple[MapDataset, Gather | None]:
        entry = self._datasets.get(name)
        if entry is None:
            ds = self._sources[name].build()
            entry = self._datasets[name] = (ds, gatherer(ds))
        return entry

    def prune(self) -> None:
        """Drop mappings of slots the ring replaced, so their memory can go."""
        if time.monotonic() - self._pruned >= _PRUNE_EVERY:
            self._pruned = time.monotonic()
            self._mappings.prune()
            self._iterators.prune(lambda ticket: self._tickets[ticket[0]] == ticket[1])

    def run(self, task: Task) -> Result:
        index, generation = task.ticket
        if index and self._tickets[index] != generation:
            return Result(task.task_id, "cancelled")
        layouts: list[bytes] = []
        gathered = 0
        start = time.perf_counter()
        try:
            ds, gather = self.dataset(task.dataset)
            start = time.perf_counter()  # the build, not a first task's loading the dataset
            segment, _ = self._mappings.get(task.slot_name)
            writer = SlotWriter(segment.tensor(task.slot_bytes))
            collate = self._collates[task.collate]
            if task.iterable is not None:
                samples, state = self._iterators.step(ds, task.iterable)
                writer.start_batch(task.limit)
                try:
                    layout = encode(run_collate(collate, samples, writer), writer).SerializeToString()
                except SlotOverflow:
                    self._iterators.keep(task.iterable, (samples, state))
                    raise
                took = time.perf_counter() - start
                return Result(task.task_id, "ok", (layout,), seconds=took, iterator_state=state)
            self._iterators.release()  # a map-style batch draws from the process's own RNGs
            sizes = task.sizes or (len(task.indices),)
            at = 0
            for size in sizes:
                # Each batch may take up to ``limit`` bytes past where it starts; the first
                # that does not fit stops the group (those before it stay good).
                writer.start_batch(task.limit)
                batch, was_gathered = build_batch(
                    ds, gather, task.indices[at : at + size], collate, writer, unbatched=task.unbatched
                )
                layouts.append(encode(batch, writer).SerializeToString())
                gathered += was_gathered
                at += size
            took = time.perf_counter() - start
            return Result(task.task_id, "ok", tuple(layouts), gathered=gathered, seconds=took)
        except Exhausted:
            return Result(task.task_id, "exhausted", seconds=time.perf_counter() - start)
        except SlotOverflow as exc:
            took = time.perf_counter() - start
            return Result(
                task.task_id, "overflow", tuple(layouts), needed=exc.needed, gathered=gathered, seconds=took
            )
        except Exception as exc:
            detail, took = traceback.format_exc(), time.perf_counter() - start
            return Result(
                task.task_id,
                "error",
                tuple(layouts),
                error=short_error(exc),
                detail=detail,
                error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                error_message=for_client(message_of(exc)),
                error_trace=for_client(detail, traceback=True),
                gathered=gathered,
                seconds=took,
            )
        finally:
            self.prune()

    def close(self) -> None:
        self._mappings.close()


def worker_main(
    index: int,
    sources: dict[str, DatasetSource],
    collates: dict[str, SlotCollate | CollateFn],
    max_segments: int,
    tickets: Any,
    tasks: Any,
    results: Connection,
    parent_pid: int,
    strict: bool,
    gated: bool = False,
) -> None:
    """A worker's life. ``strict`` (the pool's first workers): a dataset that cannot be
    loaded fails the start, naming it. A replacement instead builds what it can: a
    dataset that no longer loads (a file changed under a running server) fails only its
    own batches, loaded again at each, and the other datasets keep being served."""
    # One intra-op thread per worker: parallelism comes from the processes.
    torch.set_num_threads(1)
    # Ctrl-C in a terminal reaches the whole process group: the server decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gated and tasks.get() != GO:  # None: the pool closed before it started
        results.close()
        return
    runner = TaskRunner(sources, collates, max_segments, tickets)
    broken = []
    for name in sources:
        try:
            runner.dataset(name)
        except Exception as exc:
            if strict:
                results.send(("failed", index, f"dataset {name!r}: {type(exc).__name__}: {message_of(exc)}"))
                return
            broken.append(f"dataset {name!r}: {short_error(exc)}")
    results.send(("ready", index, "; ".join(broken)))
    try:
        while True:
            try:
                task = tasks.get(timeout=_PRUNE_EVERY)
            except queue.Empty:
                if os.getppid() != parent_pid:
                    return  # the server is gone
                runner.prune()
                continue
            if task is None:
                return
            results.send(runner.run(task))
    finally:
        runner.close()
        results.close()
