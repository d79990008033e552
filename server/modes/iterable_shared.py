"""shared mode of an IterableDataset: one stream of batches, built once, for every consumer.

The job's epoch has one :class:`Producer`: the iterators (hosted under a pool ticket
of its own, so that they outlive any one consumer's stream) and the steps in flight,
in torch's round robin as :mod:`.iterable` gives them. Whichever consumer needs the
next batch first makes it (under the producer's lock); the batches are then shared
as in :mod:`.shared`: each held until every consumer is past it, the slowest one
holding back the others within a bounded window. The epoch ends where the iterators
do: a consumer asking past that end finds it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Generator

import grpc

from batchferry.server import framing
from batchferry.server.builder import Build, Builder, Built
from batchferry.server.plan import Plan
from batchferry.server.status import Abort
from batchferry.server.stream import Stream

from .iterable import Steps, hosting, next_built
from .shared import SharedBatch, SharedEpoch, deliver, window

__all__ = ["Producer", "SharedIterableEpoch", "send"]


class Producer:
    """Makes an IterableDataset job epoch's batches in order, from ``plan.start_batch`` on."""

    def __init__(self, plan: Plan, builder: Builder, window: int) -> None:
        self._closed = False
        self._ticket = hosting(builder.pool.open_stream())
        # Its own builder: its builds belong to the job, not to the consumer that starts them.
        self._builder = dataclasses.replace(builder, ticket=self._ticket, active=lambda: not self._closed)
        self._steps = Steps(plan, self._ticket, 0, 1)
        self._window = window
        self._pending: list[Build] = []
        self._lock = threading.Lock()
        self.made = plan.start_batch  # the next batch's index
        self.end: int | None = None  # the epoch's length, once the iterators are all exhausted
        self._failure: Abort | None = None

    def make(self, position: int) -> Built | None:
        """Batch ``position`` (the next one), or None past the epoch's end."""
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self.end is not None and position >= self.end:
                return None
            if position != self.made:
                raise Abort(grpc.StatusCode.INTERNAL, f"batch {position} asked of a job at batch {self.made}")
            try:
                built = next_built(self._builder, self._steps, self._pending, self._window)
            except Abort as exc:
                self._failure = exc
                raise
            if built is None:
                self.end = self.made
                return None
            built = dataclasses.replace(built, index=self.made)
            self.made += 1
            return built

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for build in self._pending:
                self._builder.drop(build)
            self._pending.clear()
            self._builder.pool.close_stream(self._ticket)  # its iterators go


class SharedIterableEpoch(SharedEpoch):
    def __init__(self, window: int, cond: threading.Condition, producer: Producer) -> None:
        super().__init__(0, window, cond)
        self.producer = producer

    @property
    def finished(self) -> bool:
        return self.producer.end is not None and not self.members

    def enter(self, consumer: int, start: int, resume: bool = False) -> int:
        """As in shared mode; but a batch nobody holds any more cannot be made again: a
        consumer that would start before the oldest one held starts there, resuming or not."""
        with self._cond:
            first = super().enter(consumer, start, resume)
            if first < self.producer.made and first not in self._entries:
                held = [p for p in self._entries if p >= first]
                first = min(held) if held else self.producer.made
                self.consumed[consumer] = self.released[consumer] = first
            return first

    def close(self) -> None:
        self.producer.close()


def send(stream: Stream) -> Generator[bytes, None, bool]:
    job = stream.job
    assert job is not None  # the servicer joins job modes

    def make() -> SharedIterableEpoch:
        size = window(stream)
        return SharedIterableEpoch(size, job.cond, Producer(stream.plan, stream.builder, size))

    work = job.epoch_state(stream.plan.epoch, make)
    assert isinstance(work, SharedIterableEpoch)

    def ended(position: int) -> bool:
        return work.producer.end is not None and position >= work.producer.end

    def claim(position: int) -> SharedBatch:
        entry, mine = work.claim(position)
        if mine:
            built = None
            try:
                built = work.producer.make(position)
            finally:
                work.publish_built(entry, built)
        return entry

    return (
        yield from deliver(
            stream, work, lambda p: framing.start_frame(0, stream.order, p), ended=ended, claim=claim
        )
    )
