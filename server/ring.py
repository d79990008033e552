"""The ring of reusable shared-memory slots that workers build batches into.

Owner: the server process. A slot is FREE, or HELD by one stream from the moment
it is acquired until that stream has copied the batch out (byte stream) and
releases it. Slots start small and grow to the largest batch seen (plus a margin),
so a steady workload reuses the same segments; the total never exceeds
``max_bytes``. Lock order: ``_cond`` is the only lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batchferry import shm

__all__ = ["RingExhausted", "Slot", "SlotRing"]

_GROWTH = 1.25
_ROUND = 1 << 20


class RingExhausted(Exception):
    """A batch is larger than the whole shared-memory budget allows."""


@dataclass
class Slot:
    index: int
    segment: shm.Segment

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def capacity(self) -> int:
        return self.segment.size


class SlotRing:
    def __init__(self, num_slots: int, max_bytes: int, initial_bytes: int = _ROUND) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_bytes < num_slots * initial_bytes:
            raise ValueError(f"max_bytes {max_bytes} cannot hold {num_slots} slots of {initial_bytes} bytes")
        self.max_bytes = max_bytes
        self._token = shm.new_token()
        self._generation = 0
        self._cond = threading.Condition()
        self._closed = False
        # A small segment holding a random token: a client that can read it shares
        # /dev/shm with this server and may map slots directly.
        self.probe_token = secrets.token_bytes(16)
        self._probe = shm.Segment.create(shm.new_name(self._token, 0), len(self.probe_token))
        self._probe.tensor[:] = torch.frombuffer(bytearray(self.probe_token), dtype=torch.uint8)
        self._slots: list[Slot] = []
        try:
            for i in range(num_slots):
                self._slots.append(Slot(i, self._new_segment(initial_bytes)))
        except BaseException:
            self.close()
            raise
        self._free = list(range(num_slots))

    def _new_segment(self, size: int) -> shm.Segment:
        self._generation += 1
        return shm.Segment.create(shm.new_name(self._token, self._generation), size)

    @property
    def probe_name(self) -> str:
        return self._probe.name

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @property
    def free_slots(self) -> int:
        with self._cond:
            return len(self._free)

    @property
    def total_bytes(self) -> int:
        return sum(s.capacity for s in self._slots)

    def segment_names(self) -> list[str]:
        with self._cond:
            return [self._probe.name, *(s.name for s in self._slots)]

    def acquire(
        self, min_bytes: int, *, timeout: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Slot | None:
        """A free slot of at least ``min_bytes``; None on timeout, cancel or close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free:
                remaining = deadline - time.monotonic()
                if self._closed or cancelled() or remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.1))
            if self._closed:
                return None
            # Prefer a slot that is already large enough.
            pick = next((i for i in self._free if self._slots[i].capacity >= min_bytes), self._free[0])
            slot = self._slots[pick]
            if slot.capacity < min_bytes:
                size = -(-int(min_bytes * _GROWTH) // _ROUND) * _ROUND
                if self.total_bytes - slot.capacity + size > self.max_bytes:
                    size = self.max_bytes - (self.total_bytes - slot.capacity)
                    if size < min_bytes:
                        raise RingExhausted(
                            f"a batch of {min_bytes} bytes does not fit the server's shared-memory "
                            f"budget of {self.max_bytes} bytes over {self.num_slots} slots"
                        )
                slot.segment.close()
                slot = self._slots[pick] = Slot(pick, self._new_segment(size))
            self._free.remove(pick)
            return slot

    def release(self, slot: Slot) -> None:
        with self._cond:
            if self._slots[slot.index] is slot and slot.index not in self._free:
                self._free.append(slot.index)
                self._cond.notify()

    def close(self) -> None:
        """Unlink every segment; streams waiting in acquire() get None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            for slot in self._slots:
                slot.segment.close()
            self._probe.close()
