"""Worker processes that fetch samples and collate them into ring slots.

A :class:`WorkerPool` owns N spawned processes, each with its own task queue and
result pipe (a worker that dies mid-write can block nobody else). The server hands
it a :class:`Task` (which samples, which collate, which slot) and gets a
``Future[Result]``. Workers write only into the slot they
are given and send back the small Layout message, never payload bytes.

With ``num_workers=0`` the same task code runs on one thread of the server
process (handy for debugging and small tests).

A worker that dies is replaced at once. The task it was building is built again
on a live worker when a signal killed it (the OOM killer, an operator): that is
not the dataset's fault. After ``MAX_ATTEMPTS`` such deaths, or when the worker
exited by itself (the dataset called ``os._exit``), the task fails naming the
cause. A group of batches whose worker died is built again as its first batch
alone (the stream builds the rest anew): which batch killed it is unknown, and
only the batch at fault may fail. Tasks queued behind it go to live workers as
they are. The steps of an IterableDataset stream's iterators hosted by the dead
worker are not built again (the iterator's place died with it): they come back
"lost". Workers exit by themselves when the server process goes away.

A failed task tells the client what the dataset raised (its class, message and
traceback) with server paths reduced to file names (:mod:`.failures`); the
whole traceback is for the server's log.

Lock order: ``WorkerPool._lock`` is a leaf (queue puts do not block).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_objects
from typing import Any

import torch.multiprocessing as tmp

from .collate import CollateFn, SlotCollate
from .datasets import DatasetSource
from .failures import DIED, death
from .iterators import host_of
from .tasks import GO as _GO
from .tasks import Result, Task, TaskRunner, worker_main

__all__ = ["MAX_ATTEMPTS", "Result", "Task", "WorkerPool"]

log = logging.getLogger("batchferry.server")

MAX_ATTEMPTS = 3  # builds of one task on workers killed by a signal, before it fails
_READY_TIMEOUT = 120.0
_POLL = 0.1  # seconds between looks for dead workers and a gone server
_JOIN = 5.0
_TICKETS = 4096  # streams whose queued tasks can be cancelled at once


@dataclass
class _Pending:
    task: Task
    future: Future[Result]
    worker: int = -1
    deaths: int = 0  # workers that died building it
    queued: int = 0  # when it was queued: a worker takes its tasks in that order


class WorkerPool:
    """N worker processes (or the calling process when N is 0)."""

    def __init__(
        self,
        sources: dict[str, DatasetSource],
        collates: dict[str, SlotCollate | CollateFn],
        num_workers: int,
        max_segments: int = 64,
        *,
        start: bool = True,
    ) -> None:
        """``start=False`` spawns the workers but leaves them waiting, their imports done,
        until :meth:`start`: the server builds its datasets meanwhile (listings, downloads),
        and the workers load theirs from what that left (a warm cache) once told to."""
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self.restarts = 0  # workers replaced after dying
        self.cancelled = 0  # tasks skipped because their stream had ended
        self._sources = sources
        self._collates = collates
        self._max_segments = max_segments
        self._ids = itertools.count(1)
        self._queued = itertools.count()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._inline: ThreadPoolExecutor | None = None
        self._inline_runner: TaskRunner | None = None
        self._ctx = tmp.get_context("spawn")
        # Open streams' generations, shared with the workers (index 0: no stream).
        self._tickets: Any = self._ctx.RawArray(ctypes.c_uint64, _TICKETS)
        self._free_tickets = list(range(_TICKETS - 1, 0, -1))
        self._generations = itertools.count(1)
        # Per worker: a task queue in, a result pipe out. Nothing is shared between
        # workers, so one that dies mid-write cannot leave a lock held for the others.
        self._results: list[Connection] = []
        self._queues: list[Any] = []
        self._procs: list[Any] = []
        self._dispatcher: threading.Thread | None = None
        if num_workers == 0:
            self._inline_runner = TaskRunner(sources, collates, max_segments, self._tickets)
            for name in sources:
                self._inline_runner.dataset(name)
            self._inline = ThreadPoolExecutor(1, thread_name_prefix="batchferry-inline")
            return
        try:
            for i in range(num_workers):
                self._queues.append(self._ctx.Queue())
                self._results.append(None)  # type: ignore[arg-type]  # _spawn sets it
                self._procs.append(self._spawn(i, gated=True))
        except BaseException:
            self.close()
            raise
        if start:
            self.start()

    def start(self) -> None:
        """Let the first workers load the datasets; return once every one has (a worker
        that cannot fails the start, naming the dataset). Once only; inline: nothing to do."""
        if self._inline is not None or self._dispatcher is not None:
            return
        try:
            for q in self._queues:
                q.put(_GO)
            self._wait_ready(set(range(self.num_workers)))
        except BaseException:
            self.close()
            raise
        self._dispatcher = threading.Thread(target=self._dispatch, name="batchferry-results", daemon=True)
        self._dispatcher.start()

    def _spawn(self, index: int, *, strict: bool = True, gated: bool = False) -> Any:
        """Start worker ``index`` on its task queue, with a fresh result pipe."""
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main,
            args=(
                index,
                self._sources,
                self._collates,
                self._max_segments,
                self._tickets,
                self._queues[index],
                writer,
                os.getpid(),
                strict,
                gated,
            ),
            name=f"batchferry-worker-{index}",
            daemon=True,
        )
        proc.start()
        writer.close()  # the worker holds the only writer: its death closes the pipe
        self._results[index] = reader
        return proc

    def _wait_ready(self, pending: set[int]) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        while pending:
            ready = wait_for_objects(
                [self._results[i] for i in pending], timeout=max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise RuntimeError(f"worker(s) {sorted(pending)} did not start in {_READY_TIMEOUT:.0f}s")
            for conn in ready:
                index = next(i for i in pending if self._results[i] is conn)
                try:
                    kind, _, message = self._results[index].recv()
                except (EOFError, OSError):
                    kind, message = "failed", f"exited with code {self._procs[index].exitcode}"
                if kind == "failed":
                    raise RuntimeError(f"worker {index} could not load the datasets: {message}")
                pending.discard(index)

    def open_stream(self) -> tuple[int, int]:
        """A ticket for a stream's tasks (``(0, 0)`` when all are taken: never cancelled)."""
        with self._lock:
            if not self._free_tickets:
                return (0, 0)
            index, generation = self._free_tickets.pop(), next(self._generations)
            self._tickets[index] = generation
            return index, generation

    def close_stream(self, ticket: tuple[int, int]) -> None:
        """The stream is over: its tasks not yet started are skipped."""
        index, generation = ticket
        with self._lock:
            if index and self._tickets[index] == generation:
                self._tickets[index] = 0
                self._free_tickets.append(index)

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs]

    def submit(self, task: Task) -> Future[Result]:
        future: Future[Result] = Future()
        entry = _Pending(replace(task, task_id=next(self._ids)), future)
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            self._pending[entry.task.task_id] = entry
            if self._inline is not None:
                runner = self._inline_runner
                assert runner is not None
                self._inline.submit(lambda: self._complete(runner.run(entry.task)))
                return future
            self._assign(entry)
        return future

    def _assign(self, entry: _Pending) -> None:
        """Queue ``entry`` on the least-loaded worker (caller holds ``_lock``).

        Reaping swaps a dead worker's queue under the same lock, so a task is never
        put on the queue of a worker already found dead.
        """
        if entry.task.iterable is not None:  # its iterator lives in one process
            entry.worker = host_of(entry.task.iterable, self.num_workers)
        else:
            load = [0] * self.num_workers
            for other in self._pending.values():
                if other.worker >= 0:
                    load[other.worker] += 1
            entry.worker = min(range(self.num_workers), key=load.__getitem__)
        entry.queued = next(self._queued)
        self._queues[entry.worker].put(entry.task)

    @property
    def pending(self) -> int:
        """Tasks submitted and not yet done."""
        with self._lock:
            return len(self._pending)

    def _complete(self, result: Result) -> None:
        with self._lock:
            entry = self._pending.pop(result.task_id, None)
            self.cancelled += result.status == "cancelled"
        if entry is not None and not entry.future.done():
            entry.future.set_result(result)

    def _dispatch(self) -> None:
        """Collect results from every worker's pipe; replace a worker whose pipe closes."""
        while not self._closed:
            pipes = {id(conn): i for i, conn in enumerate(self._results)}
            for conn in wait_for_objects(list(self._results), timeout=_POLL):
                index = pipes[id(conn)]
                try:
                    item = self._results[index].recv()
                except (EOFError, OSError):  # died, perhaps halfway through a message
                    if not self._closed:
                        self._replace(index)
                    continue
                if isinstance(item, Result):
                    self._complete(item)
                elif isinstance(item, tuple) and item[0] == "ready" and item[2]:
                    log.error("replacement worker %d cannot load (its batches fail): %s", item[1], item[2])

    def _replace(self, index: int) -> None:
        old = self._procs[index]
        old.join(timeout=_JOIN)
        if old.is_alive():  # it closed its pipe but lives on: make it so
            old.kill()
            old.join(timeout=_JOIN)
        code = old.exitcode
        self._results[index].close()
        with self._lock:
            if self._closed:
                return
            lost = [e for e in self._pending.values() if e.worker == index]
            # A fresh queue: the dead worker may have died holding the old one's lock.
            stale, self._queues[index] = self._queues[index], self._ctx.Queue()
            self._procs[index] = self._spawn(index, strict=False)
            self.restarts += 1
            failed = []
            # The task it was building (if any) is the first it took; the rest waited behind it.
            building = min(lost, key=lambda e: e.queued, default=None)
            for entry in sorted(lost, key=lambda e: e.queued):
                entry.worker = -1
                if entry.task.iterable is not None:  # its iterator died with the process
                    entry.deaths += entry is building
                    failed.append(entry)
                    del self._pending[entry.task.task_id]
                    continue
                if entry is not building:
                    self._assign(entry)
                    continue
                entry.deaths += 1
                if len(entry.task.sizes) > 1:
                    entry.task = _first_batch(entry.task)  # the rest is the stream's to build again
                    self._assign(entry)
                elif code is not None and code < 0 and entry.deaths < MAX_ATTEMPTS:
                    self._assign(entry)  # not the dataset's fault: build it again
                else:
                    failed.append(entry)
                    del self._pending[entry.task.task_id]
        stale.cancel_join_thread()
        stale.close()
        cause = death(old.pid, code)
        log.warning("%s; replaced it, %d task(s) rebuilt", cause, len(lost) - len(failed))
        for entry in failed:
            attempts = f" on {entry.deaths} workers" if entry.deaths > 1 else ""
            text = f"{cause} while building it{attempts}"
            if entry.task.iterable is not None:
                iterator = entry.task.iterable.iterator
                text = f"{cause}, which hosted iterator {iterator} of an IterableDataset stream"
                entry.future.set_result(Result(entry.task.task_id, "lost", error=text))
                continue
            entry.future.set_result(
                Result(
                    entry.task.task_id,
                    "error",
                    error=text,
                    error_type=DIED,
                    error_message=text,
                )
            )

    def close(self) -> None:
        """Stop the workers; fail tasks still in flight."""
        with self._lock:
            self._closed = True
            orphans = [e.future for e in self._pending.values()]
            self._pending.clear()
        for future in orphans:
            if not future.done():
                future.set_result(Result(0, "closed", error="server is shutting down"))
        if self._inline is not None:
            self._inline.shutdown(wait=True)
            if self._inline_runner is not None:
                self._inline_runner.close()
        for q in self._queues:
            with contextlib.suppress(Exception):
                q.put(None)
        for proc in self._procs:
            proc.join(timeout=_JOIN)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=_JOIN)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=_JOIN)
        for q in self._queues:
            q.cancel_join_thread()
            q.close()
        for conn in self._results:
            if conn is not None:
                conn.close()


def _first_batch(task: Task) -> Task:
    """A group's task cut down to its first batch."""
    return replace(task, indices=task.indices[: task.sizes[0]], sizes=())
