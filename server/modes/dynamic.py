"""dynamic mode: each batch of an epoch goes to exactly one consumer of the job, first come first served.

Per-epoch state, shared by the job's consumers (:class:`DynamicEpoch`)::

    NEW -> TAKEN(by c) -> DONE            (c took it into its training loop: a credit)
    TAKEN(by c) -> NEW, front of queue    (c left or died before that)

The epoch is finished when every batch is DONE; a consumer with nothing to take
waits while others still hold batches that might come back. Every method takes
the job's condition (``Job.cond``) itself.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Generator

import numpy as np

from batchferry.server.jobs import EpochState
from batchferry.server.stream import Stream

__all__ = ["DynamicEpoch", "send"]

log = logging.getLogger("batchferry.server")

_POLL = 0.02  # seconds between looks while other consumers hold the work


class DynamicEpoch(EpochState):
    def __init__(self, num_batches: int, cond: threading.Condition) -> None:
        super().__init__(cond)
        self.num_batches = num_batches
        self._next = 0
        self._returned: deque[int] = deque()
        self._taken: dict[int, set[int]] = {}
        self._done = np.zeros(num_batches, dtype=bool)
        self.done = 0

    @property
    def finished(self) -> bool:
        with self._cond:
            return self.done >= self.num_batches

    def take(self, consumer: int) -> int | None:
        """A batch for ``consumer``, or None when none is free now."""
        with self._cond:
            while self._next < self.num_batches and self._done[self._next]:
                self._next += 1  # taken before a restart (see mark_done)
            if self._returned:
                index = self._returned.popleft()
            elif self._next < self.num_batches:
                index = self._next
                self._next += 1
            else:
                return None
            self._taken.setdefault(consumer, set()).add(index)
            return index

    def mark_done(self, positions: np.ndarray) -> None:
        """A reconnecting consumer took these before (from a server that has restarted since)."""
        with self._cond:
            if not positions.size:
                return
            held = {p for taken in self._taken.values() for p in taken} | set(self._returned)
            fresh = [
                int(p) for p in positions if not self._done[p] and int(p) not in held and p >= self._next
            ]
            self._done[fresh] = True
            self.done += len(fresh)
            self._cond.notify_all()

    def give_back(self, consumer: int, index: int) -> None:
        with self._cond:
            if index in self._taken.get(consumer, set()):
                self._taken[consumer].discard(index)
                self._returned.appendleft(index)
                self._cond.notify_all()

    def ack(self, consumer: int, index: int) -> None:
        with self._cond:
            taken = self._taken.get(consumer, set())
            if index in taken:
                taken.discard(index)
                self._done[index] = True
                self.done += 1
                self._cond.notify_all()

    def depart(self, consumer: int) -> list[int]:
        """``consumer`` leaves: what it took but never acknowledged goes back to the queue."""
        with self._cond:
            lost = sorted(self._taken.pop(consumer, set()))
            self._returned.extend(lost)
            self.leave(consumer)
            return lost


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, messages, builder = stream.plan, stream.messages, stream.builder
    job, consumer = stream.job, stream.consumer
    assert job is not None and consumer is not None  # the servicer joins job modes
    work = job.epoch_state(plan.epoch, lambda: DynamicEpoch(plan.local_total, job.cond))
    assert isinstance(work, DynamicEpoch)
    work.join(consumer.id)
    work.mark_done(plan.taken_positions())
    sent: deque[int] = deque()  # positions sent, not yet taken into the client's loop
    acked = sent_count = 0

    def ack_due() -> None:
        # Each credit beyond the first grant: the client took one more batch into its loop.
        nonlocal acked
        while acked < messages.granted - plan.credits and sent:
            work.ack(consumer.id, sent.popleft())
            acked += 1

    yield stream.start_frame(0)
    try:
        while stream.active() and messages.open:
            ack_due()
            if sent_count >= messages.granted:
                if messages.quiet():
                    return False
                work.wait(_POLL)  # no credit: the client has not taken enough batches yet
                continue
            position = work.take(consumer.id)
            if position is None:
                if work.finished:
                    return True
                work.wait(_POLL)  # others hold batches that may come back
                continue
            try:
                build = builder.start(plan.batch_index(position), wait=True)
                assert build is not None
                built = builder.finish(build)
            except BaseException:
                work.give_back(consumer.id, position)
                raise
            yield from stream.frames(built)
            sent.append(position)
            sent_count += 1
            consumer.sent += 1
        return False
    finally:
        ack_due()  # acknowledgements that arrived with the client's goodbye still count
        lost = work.depart(consumer.id)
        if lost:
            log.info("job %r: %d batch(es) of a departed consumer go to others", job.name, len(lost))
        job.prune_epochs()
