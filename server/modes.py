"""Per-epoch state that the consumers of a shared or dynamic job coordinate through.

dynamic: each batch of the epoch goes to exactly one consumer::

    NEW -> TAKEN(by c) -> DONE            (c handed it to its training loop: a credit)
    TAKEN(by c) -> NEW, front of queue    (c left or died before that)

The epoch is finished when every batch is DONE; a consumer with nothing to take
waits while others still hold batches that might come back.

shared: every consumer receives every batch from where it joined; a batch is
built once into a slot all of them read. ``consumed[c]`` counts the batches
consumer ``c`` has taken into its training loop, ``released[c]`` those whose slot
it no longer reads; a slot is released once every consumer is past it on both.
Nobody builds beyond ``min(consumed) + window``, so the slowest consumer applies
backpressure; one that leaves stops counting. A consumer joining an epoch in
progress starts at the slowest consumer's position (the oldest batch still
held), or at its own resume point if that is later.

All methods take the job's condition (``Job.cond``) themselves.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from .ring import Slot
from .workers import Result

__all__ = ["DynamicEpoch", "SharedBatch", "SharedEpoch"]


class DynamicEpoch:
    def __init__(self, num_batches: int, cond: threading.Condition) -> None:
        self.num_batches = num_batches
        self._cond = cond
        self._next = 0
        self._returned: deque[int] = deque()
        self._taken: dict[int, set[int]] = {}
        self.done = 0

    @property
    def finished(self) -> bool:
        with self._cond:
            return self.done >= self.num_batches

    def take(self, consumer: int) -> int | None:
        """A batch for ``consumer``, or None when none is free now."""
        with self._cond:
            if self._returned:
                index = self._returned.popleft()
            elif self._next < self.num_batches:
                index = self._next
                self._next += 1
            else:
                return None
            self._taken.setdefault(consumer, set()).add(index)
            return index

    def give_back(self, consumer: int, index: int) -> None:
        with self._cond:
            self._taken.get(consumer, set()).discard(index)
            self._returned.appendleft(index)
            self._cond.notify_all()

    def ack(self, consumer: int, index: int) -> None:
        with self._cond:
            taken = self._taken.get(consumer, set())
            if index in taken:
                taken.discard(index)
                self.done += 1
                self._cond.notify_all()

    def leave(self, consumer: int) -> list[int]:
        """Return what ``consumer`` took but never acknowledged to the queue."""
        with self._cond:
            lost = sorted(self._taken.pop(consumer, set()))
            self._returned.extend(lost)
            self._cond.notify_all()
            return lost

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)


@dataclass
class SharedBatch:
    index: int
    slot: Slot | None = None
    future: Future[Result] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    failed: bool = False
    detach: bool = False  # a consumer keeps the batch: hand the slot over instead of reusing it


class SharedEpoch:
    def __init__(
        self, num_batches: int, window: int, cond: threading.Condition, release: Callable[[SharedBatch], None]
    ) -> None:
        self.num_batches = num_batches
        self.window = window
        self._cond = cond
        self._release = release
        self.consumed: dict[int, int] = {}
        self.released: dict[int, int] = {}
        self._built: dict[int, SharedBatch] = {}

    def join(self, consumer: int, start: int) -> int:
        with self._cond:
            first = max(start, min(self.consumed.values())) if self.consumed else start
            self.consumed[consumer] = self.released[consumer] = first
            return first

    def may_build(self, index: int) -> bool:
        with self._cond:
            return not self.consumed or index < min(self.consumed.values()) + self.window

    def get(self, index: int) -> tuple[SharedBatch, bool]:
        """The batch's entry, and True when the caller must build it (then call ``built``)."""
        with self._cond:
            entry = self._built.get(index)
            if entry is not None and not entry.failed:
                return entry, False
            entry = self._built[index] = SharedBatch(index)
            return entry, True

    def built(self, entry: SharedBatch, slot: Slot | None, future: Future[Result] | None) -> None:
        """Publish a build (or, with no slot, give up building so another consumer may)."""
        with self._cond:
            entry.slot, entry.future = slot, future
            if slot is None:
                entry.failed = True
                if self._built.get(entry.index) is entry:
                    del self._built[entry.index]
            elif self._built.get(entry.index) is not entry:
                self._release(entry)  # collected while it was being built
            entry.ready.set()
            self._cond.notify_all()

    def rebuild(self, old: SharedBatch) -> tuple[SharedBatch, bool]:
        """``old`` overflowed its slot: replace it once, for every consumer."""
        with self._cond:
            if self._built.get(old.index) is old:
                del self._built[old.index]
                self._release(old)
        return self.get(old.index)

    def done(self, consumer: int, index: int, detach: bool = False) -> None:
        """``consumer`` no longer reads batch ``index``'s slot (or keeps it: ``detach``)."""
        with self._cond:
            entry = self._built.get(index)
            if detach and entry is not None:
                entry.detach = True
            if consumer in self.released:
                self.released[consumer] = max(self.released[consumer], index + 1)
            self._collect()

    def consume(self, consumer: int, upto: int) -> None:
        """``consumer`` has taken every batch before ``upto`` into its loop."""
        with self._cond:
            if consumer in self.consumed and upto > self.consumed[consumer]:
                self.consumed[consumer] = upto
                self._collect()

    def leave(self, consumer: int) -> None:
        with self._cond:
            self.consumed.pop(consumer, None)
            self.released.pop(consumer, None)
            self._collect()

    def _collect(self) -> None:
        floor = min(min(self.consumed[c], self.released[c]) for c in self.consumed) if self.consumed else 0
        for index in [i for i in self._built if i < floor or not self.consumed]:
            self._release(self._built.pop(index))
        self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)
