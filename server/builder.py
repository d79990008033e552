"""Building one stream's batches into ring slots: acquire, submit, wait, grow on overflow, release.

:meth:`Builder.start` leases a slot and hands the batch to the worker pool;
:meth:`Builder.finish` waits for it and, when the batch outgrew its slot, builds it
again in a larger one (the one place that retry lives). A build nobody wants any
more is given to :meth:`Builder.drop`: its slot goes back once the worker is done
writing into it, never before.

Small batches are built several to a task and a slot (a *group*: ``more`` batches
after the first), so they share one worker round trip, one frame and one release.
A group whose batch overflows or fails part way comes back as the batches before
it; the sender builds the rest again (:attr:`Built.count` says how many came).

A batch the dataset or collate fails to build (or whose worker died) is finished
too: as a :class:`Built` of that one batch whose :attr:`Built.error` says what
failed. Its slot holds nothing but is released like any batch's, once it is sent
(in shared mode, once every consumer is past it); the stream goes on.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import KW_ONLY, dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from batchferry.layout import ALIGNMENT
from batchferry.sampling import EpochOrder
from batchferry.v1 import loader_pb2 as _pb2

from .iterators import IterStep
from .plan import Plan
from .ring import Lease, Owner, RingExhausted, SlotRing
from .status import Abort, StreamGone
from .workers import Result, Task, WorkerPool

__all__ = ["BatchFailure", "Build", "Builder", "Built", "Counters", "first_built"]

log = logging.getLogger("batchferry.server")

_T = TypeVar("_T")
_NO_SAMPLES = np.zeros(0, dtype=np.int64)
_WAIT = 0.2  # seconds between looks at the stream's liveness while waiting for a worker


@dataclass
class Counters:
    """Batches built across all streams (for tests, listings and metrics)."""

    built: int = 0
    gathered: int = 0  # of which built by the vectorised gather
    slowest: float = 0.0  # seconds of the longest build yet (what a slot wait is bounded by)
    observe: Callable[[Plan, Result], None] | None = None  # told of every finished build (metrics)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(
        self, result: Result, also: Callable[[int], None] | None = None, plan: Plan | None = None
    ) -> None:
        with self._lock:
            self.slowest = max(self.slowest, result.seconds)
            if result.layouts:  # a group cut short by a later batch delivers those before it
                self.built += len(result.layouts)
                self.gathered += result.gathered
                if also is not None:
                    also(len(result.layouts))
        if self.observe is not None and plan is not None:
            self.observe(plan, result)


@dataclass
class Build:
    """Batches handed to a worker, writing into ``lease``'s slot."""

    indices: tuple[int, ...]  # the batch, or a group's batches in order
    lease: Lease
    future: Future[Result]
    samples: np.ndarray  # int64 sample indices of them all: built again from these if need be
    sizes: tuple[int, ...] = ()  # a group's batch lengths (empty: one batch)
    batch_bytes: int = 0  # a group's room for each batch after the first
    iterable: IterStep | None = None  # an IterableDataset's step instead of samples

    @property
    def index(self) -> int:
        return self.indices[0]

    @property
    def iterator(self) -> int:
        """The IterableDataset iterator the step is of (-1: a map-style build)."""
        return self.iterable.iterator if self.iterable is not None else -1


@dataclass(frozen=True)
class BatchFailure:
    """What the dataset raised building a batch, as its client is told (``BatchError`` on the
    wire): the class as module.qualname, its message and traceback, server paths reduced."""

    type: str
    message: str
    traceback: str

    @classmethod
    def of(cls, dataset: str, index: int, result: Result) -> BatchFailure:
        """Batch ``index`` failed as ``result`` says. The server's log has the whole traceback
        under an id that the client's traceback (or, with none, its message) ends with."""
        error_id = secrets.token_hex(4)
        log.error(
            "dataset %r, batch %d failed [error %s]: %s\n%s",
            dataset, index, error_id, result.error, result.detail,
        )  # fmt: skip
        note = f"[error {error_id}: the server's log has the whole traceback]"
        if result.error_trace:
            trace = result.error_trace if result.error_trace.endswith("\n") else result.error_trace + "\n"
            return cls(result.error_type, result.error_message, f"{trace}{note}\n")
        return cls(result.error_type, f"{result.error_message} {note}", "")


@dataclass(frozen=True)
class Built:
    """Finished batches: the first's index and layout, any further ones of its group (each
    layout parsed once here, read by every consumer's frames), and the lease on the slot
    holding their bytes. With ``error``, batch ``index`` alone, which failed: no layout,
    and its slot holds nothing."""

    index: int
    lease: Lease
    layout: _pb2.Layout
    more: tuple[tuple[int, _pb2.Layout], ...] = ()
    seconds: float = 0.0  # the worker's time to build them
    error: BatchFailure | None = None
    # An IterableDataset step: the iterator that made the batch and its dataset's state
    # after it; or ``exhausted``: it had none (nothing built, the slot already gone back).
    iterator: int = -1
    iterator_state: bytes = b""
    exhausted: bool = False

    @property
    def count(self) -> int:
        return 1 + len(self.more)

    @property
    def payload_bytes(self) -> int:
        """Bytes of the slot the batches span (each layout's payload_bytes is its end)."""
        return max([self.layout.payload_bytes, *(layout.payload_bytes for _, layout in self.more)])

    @property
    def largest_bytes(self) -> int:
        """Bytes of the largest of the batches (each begins where the one before ends)."""
        ends = [self.layout.payload_bytes, *(layout.payload_bytes for _, layout in self.more)]
        return max(end - begin for begin, end in zip([0, *ends[:-1]], ends, strict=True))


@dataclass(eq=False)
class Builder:
    """One stream's builds: its plan and order, the ring its slots come from, the pool that
    builds into them, and whether anyone still wants them (``active``)."""

    plan: Plan
    order: EpochOrder | None
    ring: SlotRing
    pool: WorkerPool
    counters: Counters
    active: Callable[[], bool]
    _: KW_ONLY
    # Slots are sized for a typical batch up front; one that outgrows its slot reports its
    # size, and later builds ask for at least that.
    min_bytes: int
    max_bytes: int
    acquire_timeout: float
    ticket: tuple[int, int] = (0, 0)
    owner: Owner = field(default_factory=lambda: Owner(""))  # the stream's account at the ring
    on_built: Callable[[int], None] | None = None

    def start(
        self,
        index: int,
        *,
        wait: bool,
        samples: np.ndarray | None = None,
        more: tuple[int, ...] = (),
        batch_bytes: int = 0,
    ) -> Build | None:
        """Lease a slot and submit batch ``index`` (of ``samples``, else of the epoch's order),
        and with ``more`` the batches after it in the same slot (``batch_bytes`` of room for
        each of them); None when ``wait`` is false and no slot is free."""
        if samples is not None:
            assert not more  # a group of given samples: start_lists
            return self._submit((index,), samples, (), 0, wait=wait)
        assert self.order is not None  # streams of the client's own batches pass them
        size = self.plan.batch_size
        if more != tuple(range(index + 1, index + 1 + len(more))):  # replicas': strided
            return self.start_lists(
                [(i, self.order.batch(i, size).numpy()) for i in (index, *more)], wait, batch_bytes
            )
        # Consecutive batches: one slice of the order for all of them.
        samples = self.order.batches(index, 1 + len(more), size).numpy()
        sizes = tuple(min(size, len(samples) - k * size) for k in range(1 + len(more))) if more else ()
        return self._submit((index, *more), samples, sizes, batch_bytes if more else 0, wait=wait)

    def start_step(self, step: IterStep, *, wait: bool) -> Build | None:
        """Lease a slot and submit an IterableDataset step (its batch is numbered when sent)."""
        return self._submit((0,), _NO_SAMPLES, (), 0, wait=wait, iterable=step)

    def start_lists(
        self, batches: list[tuple[int, np.ndarray]], wait: bool, batch_bytes: int = 0
    ) -> Build | None:
        """Like :meth:`start`, for (batch index, samples) pairs: one batch, or a group."""
        indices = tuple(index for index, _ in batches)
        if len(batches) == 1:
            return self._submit(indices, batches[0][1], (), 0, wait=wait)
        sizes = tuple(len(samples) for _, samples in batches)
        samples = np.concatenate([samples for _, samples in batches])
        return self._submit(indices, samples, sizes, batch_bytes, wait=wait)

    def _submit(
        self,
        indices: tuple[int, ...],
        samples: np.ndarray,
        sizes: tuple[int, ...],
        batch_bytes: int,
        *,
        wait: bool,
        iterable: IterStep | None = None,
    ) -> Build | None:
        # Room for the largest batch yet (``min_bytes``) and the typical size for the others:
        # one rare large batch does not make every later group's slot that many times larger.
        # A group that does not fit comes back cut short and its rest is built again.
        room = min(self.min_bytes, max(ALIGNMENT, batch_bytes))
        want = self.min_bytes + (len(indices) - 1) * room
        try:
            lease = self.ring.acquire(
                want, timeout=self.acquire_timeout if wait else 0.0, cancelled=self._gone, owner=self.owner
            )
        except RingExhausted as exc:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        if lease is None:
            if self._gone():
                raise StreamGone
            if not wait:
                return None
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no shared-memory slot of {want} bytes became free within "
                f"{self.acquire_timeout:g}s (budget {self.ring.max_bytes} bytes, --shm-bytes): "
                "other streams hold them",
            )
        plan = self.plan
        task = Task(
            plan.dataset,
            samples,
            plan.collate,
            lease.name,
            lease.capacity,
            limit=self.max_bytes,
            ticket=self.ticket,
            sizes=sizes,
            unbatched=plan.unbatched,
            iterable=iterable,
        )
        try:
            future = self.pool.submit(task)
        except RuntimeError as exc:  # the pool is closing
            lease.release()
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"server is shutting down ({exc})") from exc
        future.add_done_callback(lambda f: self.counters.count(f.result(), self.on_built, plan))
        return Build(indices, lease, future, samples, sizes, batch_bytes, iterable)

    def finish(self, build: Build) -> Built:
        """The built batches, rebuilt in larger slots while the first overflows.

        A group comes back shorter than it was asked (:attr:`Built.count`) when one of
        its later batches overflowed or failed: the batches before it are good, and
        the caller builds the rest again. A first batch that failed comes back alone as
        a Built with :attr:`Built.error` (the caller builds the rest of its group again
        too). Raises Abort when no batch can be built (too large, the server closing),
        StreamGone when the stream ended meanwhile; either way the slot is taken care of.
        """
        while True:
            result = self._wait(build)
            too_big = result.status == "overflow" and result.needed > self.max_bytes
            if result.status == "overflow" and not too_big:
                self.min_bytes = max(self.min_bytes, result.needed)
            if result.layouts:  # what failed or overflowed fails alone when built again
                return self._built(build, result)
            if result.status == "exhausted":
                build.lease.release()
                return Built(build.index, build.lease, _pb2.Layout(), iterator=build.iterator, exhausted=True)
            if result.status == "lost":  # an IterableDataset's iterator died with its process
                build.lease.release()
                raise Abort(
                    grpc.StatusCode.INTERNAL,
                    f"{result.error}: the stream cannot go on (its iterator's place is lost); "
                    "iterate again, or resume from the loader's state_dict()",
                    dataset_error=True,
                )
            if result.status == "error":  # the slot goes back once the error is sent
                failure = BatchFailure.of(self.plan.dataset, build.index, result)
                return Built(
                    build.index, build.lease, _pb2.Layout(), seconds=result.seconds, error=failure,
                    iterator=build.iterator,
                )  # fmt: skip
            build.lease.release()  # the worker is done with it
            if result.status == "closed":
                raise Abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            if too_big:
                raise Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"batch {build.index} needs at least {result.needed} bytes, above the server's "
                    f"max_batch_bytes={self.max_bytes}; use a smaller batch_size (or shorter pack rows)",
                )
            # "cancelled" (started by a stream that has ended, shared mode: build it for
            # this one) or an overflow: build it again, in a slot of the size now known.
            build = self._restart(build)

    @staticmethod
    def _built(build: Build, result: Result) -> Built:
        layouts = [_pb2.Layout.FromString(raw) for raw in result.layouts]
        more = tuple(zip(build.indices[1 : len(layouts)], layouts[1:], strict=True))
        return Built(
            build.index, build.lease, layouts[0], more, result.seconds,
            iterator=build.iterator, iterator_state=result.iterator_state,
        )  # fmt: skip

    def _restart(self, old: Build) -> Build:
        build = self._submit(
            old.indices, old.samples, old.sizes, old.batch_bytes, wait=True, iterable=old.iterable
        )
        assert build is not None  # waiting starts return a build or raise
        return build

    def _wait(self, build: Build) -> Result:
        while True:
            try:
                return build.future.result(timeout=_WAIT)
            except TimeoutError:
                if self._gone():
                    self.drop(build)
                    raise StreamGone from None

    def drop(self, build: Build) -> None:
        """Forget a build; its slot is released once its worker is done writing."""
        build.future.add_done_callback(lambda _f: build.lease.release())

    def _gone(self) -> bool:
        return not self.active()


def first_built(pending: list[tuple[_T, Build]], active: Callable[[], bool]) -> tuple[_T, Build]:
    """Take the earliest of ``pending`` whose worker is done, waiting for one if none is."""
    while True:
        done, _ = wait([build.future for _, build in pending], timeout=_WAIT, return_when=FIRST_COMPLETED)
        if done:
            k = next(k for k, (_, build) in enumerate(pending) if build.future in done)
            return pending.pop(k)
        if not active():
            raise StreamGone
