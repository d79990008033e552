"""One epoch's batches from its streams, merged: in epoch order, or in any order.

In order, batch b comes from stream b % S (S streams: replicas times stripes), so the
merged epoch is what one server sends. In any order (dynamic mode, ``in_order=False``)
whichever stream has a batch first gives it, and a bitmap records which were taken.
Both count what they handed out, which is where a reopened stream starts and what a
``state_dict()`` saves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batchferry.errors import BatchTimeout, ProtocolError
from batchferry.protocol import Bitmap

from .frames import Batch
from .stream import PENDING
from .streams import StreamSet

__all__ = ["AnyOrder", "InOrder", "Merge"]

# Several streams in any order: how long to wait on one before looking at the next.
_SLICE = 0.005


class InOrder:
    """Batches in epoch order from ``start`` on; :attr:`taken` is the next batch's index."""

    def __init__(
        self, start: int, length: Callable[[], float], sampler_total: Callable[[], int | None]
    ) -> None:
        self.taken = start
        self._length = length  # the epoch's batches (inf while the caller's sampler runs)
        self._sampler_total = sampler_total  # the caller's sampler's count, once it ended
        self._ended: list[bool] = []

    @property
    def resume_point(self) -> int:
        return self.taken

    def stream_taken(self, j: int, parts: int) -> bytes:
        return b""

    def is_taken(self, index: int) -> bool:
        return index < self.taken

    @property
    def done(self) -> Bitmap:
        return Bitmap()

    def next(self, streams: StreamSet) -> Batch | None:
        if not self._ended:
            self._ended = [False] * len(streams)
        parts = len(streams)
        while self.taken < self._length():
            index = self.taken
            j = index % parts
            if index < streams.first[j]:
                self.taken += 1  # shared mode, joined late: that stream's job is past it
                continue
            batch = streams.next_from(j)
            if batch is None and self._sampler_total() == index:
                self._ended[j] = True
                break  # the caller's sampler (or an IterableDataset) ended exactly here
            if not isinstance(batch, Batch) or batch.index != index:
                got = f"batch {batch.index}" if isinstance(batch, Batch) else "the end of its stream"
                raise ProtocolError(f"{streams.where(j)} sent {got} where batch {index} was due")
            self.taken += 1
            return batch
        for j in range(parts):  # every stream's end frame: each flushes its releases
            if not self._ended[j]:
                if streams.next_from(j) is not None:
                    raise ProtocolError(f"{streams.where(j)} sent more batches than its part of the epoch")
                self._ended[j] = True
        return None


class AnyOrder:
    """Batches as they come; :attr:`done` says which of the epoch's were taken."""

    def __init__(self, done: bytes, timeout: float) -> None:
        self.done = Bitmap(done)
        self.taken = len(self.done)
        self._timeout = timeout
        self._ended: list[bool] = []
        self._turn = 0

    @property
    def resume_point(self) -> int:
        return 0  # every stream starts over, told which of its batches were taken

    def stream_taken(self, j: int, parts: int) -> bytes:
        """The batches of stream ``j`` already taken, as a bitmap over its positions."""
        return bytes(self.done.stride(j, parts)) if self.done else b""

    def is_taken(self, index: int) -> bool:
        return index in self.done

    def next(self, streams: StreamSet) -> Batch | None:
        if not self._ended:
            self._ended = [False] * len(streams)
        deadline = time.monotonic() + self._timeout
        while True:
            live = [j for j in range(len(streams)) if not self._ended[j]]
            if not live:
                return None
            wait = None if len(live) == 1 else _SLICE
            for k in range(len(live)):
                j = live[(self._turn + k) % len(live)]
                item = streams.next_from(j, wait)
                if item is PENDING:
                    continue
                self._turn += 1
                if item is None:
                    self._ended[j] = True
                    break
                assert isinstance(item, Batch)
                if item.index in self.done:
                    raise ProtocolError(f"{streams.where(j)} sent batch {item.index} a second time")
                self.done.add(item.index)
                self.taken += 1
                return item
            else:
                if time.monotonic() >= deadline:
                    if any([streams.replace_stuck_receiver(j) for j in live]):
                        deadline = time.monotonic() + self._timeout
                        continue
                    raise BatchTimeout(
                        f"no batch from any of {len(live)} streams within timeout={self._timeout}s"
                    )


Merge = InOrder | AnyOrder
