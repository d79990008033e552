"""Worker processes that fetch samples and collate them into ring slots.

A :class:`WorkerPool` owns N spawned processes, one task queue per worker and one
result queue. The server hands it a :class:`Task` (which samples, which collate,
which slot) and gets a ``Future[Result]``. Workers write only into the slot they
are given and send back the small Layout message, never payload bytes.

With ``num_workers=0`` the same task code runs on one thread of the server
process (handy for debugging and small tests).

A worker that dies fails its in-flight tasks and is replaced. Workers exit by
themselves when the server process goes away.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import traceback
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.multiprocessing as tmp

from batchferry import shm
from batchferry.layout import SlotOverflow, SlotWriter, encode

from .collate import CollateFn, SlotCollate
from .datasets import DatasetSource, MapDataset
from .fetch import Gather, build_batch, gatherer

__all__ = ["Result", "Task", "WorkerPool"]

_READY_TIMEOUT = 120.0
_POLL = 0.5


@dataclass(frozen=True)
class Task:
    dataset: str
    indices: np.ndarray  # int64
    collate: str
    slot_name: str
    slot_bytes: int
    task_id: int = 0


@dataclass(frozen=True)
class Result:
    task_id: int
    status: Literal["ok", "overflow", "error"]
    layout: bytes = b""  # serialized Layout, status "ok"
    needed: int = 0  # bytes the batch needs, status "overflow"
    error: str = ""  # status "error"
    gathered: bool = False  # built with one gather per field


class _TaskRunner:
    """Builds batches for one process: its datasets, collates and attached slots."""

    def __init__(
        self,
        sources: dict[str, DatasetSource],
        collates: dict[str, SlotCollate | CollateFn],
        max_segments: int,
    ) -> None:
        self._sources = sources
        self._max_segments = max_segments
        self._datasets: dict[str, tuple[MapDataset, Gather | None]] = {}
        self._collates = collates
        self._segments: OrderedDict[str, shm.Segment] = OrderedDict()

    def _segment(self, name: str) -> shm.Segment:
        seg = self._segments.get(name)
        if seg is None:
            seg = self._segments[name] = shm.Segment.attach(name)
            # Slots are replaced when they grow or are detached: keep only as many
            # mappings as the ring has slots, so replaced memory is not pinned here.
            while len(self._segments) > self._max_segments:
                self._segments.popitem(last=False)[1].close()
        else:
            self._segments.move_to_end(name)
        return seg

    def dataset(self, name: str) -> tuple[MapDataset, Gather | None]:
        entry = self._datasets.get(name)
        if entry is None:
            ds = self._sources[name].build()
            entry = self._datasets[name] = (ds, gatherer(ds))
        return entry

    def run(self, task: Task) -> Result:
        try:
            ds, gather = self.dataset(task.dataset)
            writer = SlotWriter(self._segment(task.slot_name).tensor[: task.slot_bytes])
            batch, gathered = build_batch(ds, gather, task.indices, self._collates[task.collate], writer)
            layout = encode(batch, writer).SerializeToString()
            return Result(task.task_id, "ok", layout=layout, gathered=gathered)
        except SlotOverflow as exc:
            return Result(task.task_id, "overflow", needed=exc.needed)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return Result(
                task.task_id,
                "error",
                error=f"{type(exc).__name__}: {exc} (at {os.path.basename(where.filename)}:{where.lineno})",
            )

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()


def _worker_main(
    index: int,
    sources: dict[str, DatasetSource],
    collates: dict[str, SlotCollate | CollateFn],
    max_segments: int,
    tasks: Any,
    results: Any,
    parent_pid: int,
) -> None:
    # One intra-op thread per worker: parallelism comes from the processes.
    torch.set_num_threads(1)
    runner = _TaskRunner(sources, collates, max_segments)
    try:
        for name in sources:
            runner.dataset(name)
        results.put(("ready", index, ""))
    except Exception as exc:
        results.put(("failed", index, f"{type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            try:
                task = tasks.get(timeout=_POLL)
            except queue.Empty:
                if os.getppid() != parent_pid:
                    return  # the server is gone
                continue
            if task is None:
                return
            results.put(runner.run(task))
    finally:
        runner.close()


class WorkerPool:
    """N worker processes (or the calling process when N is 0)."""

    def __init__(
        self,
        sources: dict[str, DatasetSource],
        collates: dict[str, SlotCollate | CollateFn],
        num_workers: int,
        max_segments: int = 64,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._sources = sources
        self._collates = collates
        self._max_segments = max_segments
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._futures: dict[int, Future[Result]] = {}
        self._assigned: list[set[int]] = [set() for _ in range(num_workers)]
        self._closed = False
        self._inline: ThreadPoolExecutor | None = None
        self._inline_runner: _TaskRunner | None = None
        self._ctx = tmp.get_context("spawn")
        self._results: Any = None
        self._queues: list[Any] = []
        self._procs: list[Any] = []
        self._dispatcher: threading.Thread | None = None
        if num_workers == 0:
            self._inline_runner = _TaskRunner(sources, collates, max_segments)
            for name in sources:
                self._inline_runner.dataset(name)
            self._inline = ThreadPoolExecutor(1, thread_name_prefix="batchferry-inline")
            return
        self._results = self._ctx.Queue()
        try:
            for i in range(num_workers):
                self._queues.append(self._ctx.Queue())
                self._procs.append(self._spawn(i))
            self._wait_ready(set(range(num_workers)))
        except BaseException:
            self.close()
            raise
        self._dispatcher = threading.Thread(target=self._dispatch, name="batchferry-results", daemon=True)
        self._dispatcher.start()

    def _spawn(self, index: int) -> Any:
        proc = self._ctx.Process(
            target=_worker_main,
            args=(
                index,
                self._sources,
                self._collates,
                self._max_segments,
                self._queues[index],
                self._results,
                os.getpid(),
            ),
            name=f"batchferry-worker-{index}",
            daemon=True,
        )
        proc.start()
        return proc

    def _wait_ready(self, pending: set[int]) -> None:
        while pending:
            try:
                kind, index, message = self._results.get(timeout=_READY_TIMEOUT)
            except queue.Empty:
                raise RuntimeError(
                    f"worker(s) {sorted(pending)} did not start in {_READY_TIMEOUT:.0f}s"
                ) from None
            if kind == "failed":
                raise RuntimeError(f"worker {index} could not load the datasets: {message}")
            pending.discard(index)

    def submit(self, task: Task) -> Future[Result]:
        future: Future[Result] = Future()
        task_id = next(self._ids)
        task = Task(task.dataset, task.indices, task.collate, task.slot_name, task.slot_bytes, task_id)
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            self._futures[task_id] = future
            if self._inline is not None:
                runner = self._inline_runner
                assert runner is not None
                self._inline.submit(lambda: self._complete(runner.run(task)))
                return future
            # Least-loaded worker keeps every process busy without a shared queue lock.
            target = min(range(self.num_workers), key=lambda i: len(self._assigned[i]))
            self._assigned[target].add(task_id)
        self._queues[target].put(task)
        return future

    def _complete(self, result: Result) -> None:
        with self._lock:
            future = self._futures.pop(result.task_id, None)
            for assigned in self._assigned:
                assigned.discard(result.task_id)
        if future is not None:
            future.set_result(result)

    def _dispatch(self) -> None:
        while True:
            try:
                item = self._results.get(timeout=_POLL)
            except queue.Empty:
                item = None
            except (EOFError, OSError, ValueError):
                return
            if isinstance(item, Result):
                self._complete(item)
            if self._closed:
                return
            self._reap_dead()

    def _reap_dead(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc.is_alive():
                continue
            with self._lock:
                if self._closed:
                    return
                lost = list(self._assigned[i])
                self._assigned[i].clear()
            message = f"worker process {proc.pid} died (exit code {proc.exitcode}) while building a batch"
            for task_id in lost:
                self._complete(Result(task_id, "error", error=message))
            # A fresh queue: the dead worker may have died holding the old one's lock.
            self._queues[i] = self._ctx.Queue()
            self._procs[i] = self._spawn(i)

    def close(self) -> None:
        """Stop the workers; fail tasks still in flight."""
        with self._lock:
            self._closed = True
            orphans = list(self._futures.values())
            self._futures.clear()
        for future in orphans:
            if not future.done():
                future.set_result(Result(0, "error", error="server is shutting down"))
        if self._inline is not None:
            self._inline.shutdown(wait=True)
            if self._inline_runner is not None:
                self._inline_runner.close()
        for q in self._queues:
            with contextlib.suppress(Exception):
                q.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        for q in [*self._queues, self._results]:
            if q is not None:
                q.close()
                q.join_thread()
