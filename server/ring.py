"""The ring of reusable shared-memory slots that workers build batches into.

Owner: the server process. A slot is FREE, or HELD from the moment a stream
acquires it until the batch in it has been copied out (byte stream) or released
by the client that maps it (same host). Slots start small and grow to the largest
batch seen (plus a margin), so a steady workload reuses the same segments. When
every slot is held for a while (many streams, clients holding prefetched batches)
the ring adds slots; the total never exceeds ``max_bytes``. Lock order: ``_cond``
is the only lock.
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
# How long a stream waits with no free slot before the ring adds one.
_ADD_AFTER = 1.0


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
        self._lingering: list[tuple[float, shm.Segment]] = []
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
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while not self._free:
                remaining = deadline - time.monotonic()
                if self._closed or cancelled() or remaining <= 0:
                    return None
                if time.monotonic() - start >= _ADD_AFTER and self._add(min_bytes):
                    break
                self._cond.wait(min(remaining, 0.05))
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

    def _add(self, min_bytes: int) -> bool:
        """Add a slot if the budget allows (caller holds ``_cond``)."""
        size = max(_ROUND, -(-min_bytes // _ROUND) * _ROUND)
        if self.total_bytes + size > self.max_bytes:
            return False
        self._slots.append(Slot(len(self._slots), self._new_segment(size)))
        self._free.append(len(self._slots) - 1)
        return True

    def detach(self, slot: Slot, linger: float = 0.0) -> None:
        """Give a held slot's memory away: a fresh segment takes its place in the ring.

        Unlinking leaves the pages to whoever still maps them (a client keeping the
        batch); they are freed when the last mapping goes. ``linger`` delays the
        unlink, for a client that was sent the slot's name but may not have opened
        it yet (a stream that ended abnormally).
        """
        with self._cond:
            self._sweep()
            if self._closed or self._slots[slot.index] is not slot or slot.index in self._free:
                return
            if linger > 0:
                self._lingering.append((time.monotonic() + linger, slot.segment))
            else:
                slot.segment.close()
            self._slots[slot.index] = Slot(slot.index, self._new_segment(slot.capacity))
            self._free.append(slot.index)
            self._cond.notify()

    def _sweep(self) -> None:
        """Unlink lingering segments whose time is up (caller holds ``_cond``)."""
        now = time.monotonic()
        due = [seg for deadline, seg in self._lingering if deadline <= now]
        self._lingering = [(d, seg) for d, seg in self._lingering if d > now]
        for seg in due:
            seg.close()

    def release(self, slot: Slot) -> None:
        with self._cond:
            self._sweep()
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
            for _, seg in self._lingering:
                seg.close()
            self._lingering = []
            self._probe.close()
