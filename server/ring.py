"""The ring of shared-memory slots that workers build batches into, and the leases on them.

Owner: the server (one ring, one :class:`~batchferry.shm.Arena`). Every slot is in
exactly one state, and only the ring changes it, under its lock::

    FREE ──acquire──▶ LEASED ──release──▶ FREE
                        ├──detach───▶ RETIRED
                        └──abandon──▶ LINGERING ──(linger seconds)──▶ RETIRED
    FREE ──(outgrown by a larger batch)──▶ RETIRED

* LEASED: held through one :class:`Lease` by one stream, from before its batch is
  built until the client is done with it. Only that lease moves the slot on; every
  transition is idempotent, and a lease that has ended can never touch the slot
  again (the next acquisition makes a new lease).
* LINGERING: sent to a client whose stream then ended abnormally; the client may
  not have mapped it yet, so the name stays valid and the slot is never reused.
* RETIRED: unlinked and out of the ring. Its memory lives while some client maps
  it (a batch the client keeps) and counts until the last such mapping is gone.

Budget: the bytes of every live segment, in every state, never exceed ``max_bytes``.
A batch that can never fit, or a full ``/dev/shm``, gets :class:`RingExhausted`
naming the budget and the bytes asked for; the ring is left as it was. Slots start
small and grow to the largest batch seen plus a margin, so a steady workload reuses
the same segments.

Lock order: ``SlotRing._cond`` is a leaf: nothing that takes another lock is called
while it is held.
"""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from batchferry import shm

__all__ = ["Lease", "RingExhausted", "SlotRing", "SlotState"]

_GROWTH = 1.25
_ROUND = 1 << 20
# How long a stream waits with every slot leased before the ring adds one.
_ADD_AFTER = 0.5
_WAIT = 0.05  # seconds between looks at lingering and retired slots while waiting
_PROBE_BYTES = 16


class RingExhausted(Exception):
    """No slot can hold the batch: larger than the budget, budget taken, or /dev/shm full."""


class SlotState(enum.Enum):
    FREE = "free"
    LEASED = "leased"
    LINGERING = "lingering"
    RETIRED = "retired"


@dataclass(eq=False)
class _Slot:
    segment: shm.Segment
    state: SlotState = SlotState.FREE
    lease: Lease | None = None
    until: float = 0.0  # LINGERING: when it retires

    @property
    def capacity(self) -> int:
        return self.segment.size


class Lease:
    """One acquisition of one slot: the only handle that can give it back."""

    __slots__ = ("_ring", "_slot")

    def __init__(self, ring: SlotRing, slot: _Slot) -> None:
        self._ring = ring
        self._slot = slot

    @property
    def name(self) -> str:
        return self._slot.segment.name

    @property
    def capacity(self) -> int:
        return self._slot.capacity

    @property
    def segment(self) -> shm.Segment:
        return self._slot.segment

    @property
    def active(self) -> bool:
        return self._slot.lease is self

    def release(self) -> None:
        """LEASED -> FREE: nobody reads the slot any more."""
        self._ring._end(self, SlotState.FREE)

    def detach(self) -> None:
        """LEASED -> RETIRED: a client keeps the batch; the slot leaves the ring."""
        self._ring._end(self, SlotState.RETIRED)

    def abandon(self) -> None:
        """LEASED -> LINGERING: a client may still map it; never reuse it."""
        self._ring._end(self, SlotState.LINGERING)

    def __repr__(self) -> str:
        return f"Lease({self.name}, {self.capacity} bytes, {'active' if self.active else 'ended'})"


@dataclass
class RingStats:
    """Counts and bytes of the ring's segments by state, for tests and metrics."""

    slots: dict[SlotState, int] = field(default_factory=dict)
    bytes: dict[SlotState, int] = field(default_factory=dict)
    max_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


class SlotRing:
    def __init__(
        self,
        num_slots: int,
        max_bytes: int,
        *,
        max_slots: int | None = None,
        initial_bytes: int = _ROUND,
        linger: float = 5.0,
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_bytes < num_slots * initial_bytes:
            raise ValueError(f"max_bytes {max_bytes} cannot hold {num_slots} slots of {initial_bytes} bytes")
        self.max_bytes = max_bytes
        self.target_slots = num_slots
        self.max_slots = max(num_slots, max_slots or 4 * num_slots)
        self.linger = linger
        self._cond = threading.Condition()
        # Acquires blocked for a slot. While there are any, an acquire that will not
        # wait (a stream that already has builds in flight) is refused, so freed slots
        # go first to the streams that have none: a busy stream cannot starve an idle one.
        self._waiting = 0
        self._closed = False
        self._slots: list[_Slot] = []  # every live segment, in any state
        self._arena = shm.Arena()
        self._probe: shm.Segment | None = None
        try:
            # A small segment holding a random token: a client that can read it shares
            # /dev/shm with this server and may map slots directly.
            self.probe_token = secrets.token_bytes(_PROBE_BYTES)
            self._probe = self._arena.create(len(self.probe_token))
            self._probe.array()[:] = np.frombuffer(self.probe_token, dtype=np.uint8)
            for _ in range(num_slots):
                self._slots.append(_Slot(self._arena.create(initial_bytes)))
        except BaseException:
            self.close()
            raise

    # -- facts ------------------------------------------------------------------------
    @property
    def probe_name(self) -> str:
        assert self._probe is not None
        return self._probe.name

    @property
    def token(self) -> str:
        return self._arena.token

    @property
    def num_slots(self) -> int:
        """Slots in the ring (FREE or LEASED)."""
        with self._cond:
            return len(self._ring())

    @property
    def free_slots(self) -> int:
        with self._cond:
            return sum(s.state is SlotState.FREE for s in self._slots)

    def stats(self) -> RingStats:
        with self._cond:
            self._sweep()
            out = RingStats(max_bytes=self.max_bytes)
            for state in SlotState:
                of = [s for s in self._slots if s.state is state]
                out.slots[state] = len(of)
                out.bytes[state] = sum(s.capacity for s in of)
            return out

    def segment_names(self) -> list[str]:
        with self._cond:
            names = [s.segment.name for s in self._slots if s.state is not SlotState.RETIRED]
            return [self.probe_name, *names]

    def _ring(self) -> list[_Slot]:
        return [s for s in self._slots if s.state in (SlotState.FREE, SlotState.LEASED)]

    def _used(self) -> int:
        return _PROBE_BYTES + sum(s.capacity for s in self._slots)

    # -- leases -----------------------------------------------------------------------
    def acquire(
        self, min_bytes: int, *, timeout: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Lease | None:
        """A lease on a slot of at least ``min_bytes``.

        None when ``timeout`` passes (0: do not wait), ``cancelled()`` turns true or the
        ring closes. ``RingExhausted`` when the batch can never fit the budget or
        ``/dev/shm`` is full.
        """
        if min_bytes + _PROBE_BYTES > self.max_bytes:
            raise RingExhausted(
                f"a batch of {min_bytes} bytes does not fit the server's shared-memory budget of "
                f"{self.max_bytes} bytes (--shm-bytes)"
            )
        start = time.monotonic()
        deadline = start + timeout
        if timeout <= 0:
            with self._cond:
                if self._closed or self._waiting:
                    return None
                self._sweep()
                return self._lease(self._take(min_bytes, waited=0.0))
        with self._cond:
            self._waiting += 1
        try:
            while True:
                # ``cancelled`` asks the stream (gRPC's own locks): never under ``_cond``.
                if cancelled():
                    return None
                with self._cond:
                    if self._closed:
                        return None
                    self._sweep()
                    lease = self._lease(self._take(min_bytes, waited=time.monotonic() - start))
                    if lease is not None:
                        return lease
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(min(remaining, _WAIT))
        finally:
            with self._cond:
                self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Acquires blocked for a slot now."""
        with self._cond:
            return self._waiting

    def _lease(self, slot: _Slot | None) -> Lease | None:
        """Lease ``slot`` (caller holds ``_cond``)."""
        if slot is None:
            return None
        slot.state, slot.lease = SlotState.LEASED, Lease(self, slot)
        return slot.lease

    def fits(self, min_bytes: int) -> int:
        """How many slots for batches of ``min_bytes`` the ring can have: what the byte
        budget holds at the size a new slot gets, at most ``max_slots``."""
        return max(1, min(self.max_slots, self.max_bytes // _new_slot_bytes(min_bytes)))

    def _take(self, min_bytes: int, waited: float) -> _Slot | None:
        """A FREE slot fit for ``min_bytes``, grown or added if need be (caller holds ``_cond``)."""
        free = [s for s in self._slots if s.state is SlotState.FREE]
        fit = min((s for s in free if s.capacity >= min_bytes), key=lambda s: s.capacity, default=None)
        if fit is not None:
            return fit
        size = _new_slot_bytes(min_bytes)
        room = self.max_bytes - self._used()
        if free:
            # Outgrown: retire free slots, largest first, until the new size fits. A
            # retired slot still mapped by a client counts until the client lets go,
            # so its room may come only later (the caller waits and looks again).
            coming = 0
            for victim in sorted(free, key=lambda s: -s.capacity):
                if room + coming >= size:
                    break
                coming += victim.capacity
                self._retire(victim)
                room = self.max_bytes - self._used()
            if room < min_bytes:
                return None
            return self._new(max(min_bytes, min(size, room)), min_bytes, replaces=free[0])
        ring = len(self._ring())
        may_add = ring < self.target_slots or (waited >= _ADD_AFTER and ring < self.max_slots)
        if may_add and room >= min_bytes:
            return self._new(max(min_bytes, min(size, room)), min_bytes)
        return None

    def _new(self, size: int, min_bytes: int, replaces: _Slot | None = None) -> _Slot:
        try:
            segment = self._arena.create(size)
        except OSError as exc:
            raise RingExhausted(
                f"/dev/shm is full ({exc.strerror}): cannot allocate {size} bytes for a batch of "
                f"{min_bytes} bytes (budget {self.max_bytes} bytes, {self._used()} in use by this server)"
            ) from exc
        if replaces is not None and replaces.state is SlotState.FREE:
            self._retire(replaces)
        slot = _Slot(segment)
        self._slots.append(slot)
        return slot

    def _end(self, lease: Lease, to: SlotState) -> None:
        with self._cond:
            slot = lease._slot
            if slot.lease is not lease:
                return  # already ended: idempotent
            slot.lease = None
            if self._closed:
                return
            if to is SlotState.FREE:
                slot.state = SlotState.FREE
            elif to is SlotState.LINGERING:
                slot.state, slot.until = SlotState.LINGERING, time.monotonic() + self.linger
            else:
                self._retire(slot)
            self._cond.notify_all()

    def _retire(self, slot: _Slot) -> None:
        slot.state = SlotState.RETIRED
        slot.segment.unlink()
        slot.segment.unmap()
        self._forget_if_unmapped(slot)
        self._cond.notify_all()

    def _forget_if_unmapped(self, slot: _Slot) -> None:
        if not slot.segment.mapped_elsewhere():
            slot.segment.close()
            self._slots.remove(slot)

    def _sweep(self) -> None:
        """Retire lingering slots whose time is up; forget retired ones nobody maps.

        The caller holds ``_cond``.
        """
        now = time.monotonic()
        for slot in [s for s in self._slots if s.state is SlotState.LINGERING and s.until <= now]:
            self._retire(slot)
        for slot in [s for s in self._slots if s.state is SlotState.RETIRED]:
            self._forget_if_unmapped(slot)

    def close(self) -> None:
        """Unlink every segment; waiting acquires return None; leases end. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            for slot in self._slots:
                slot.lease = None
                slot.segment.close()
            self._slots = []
        if self._probe is not None:
            self._probe.close()
        self._arena.close()


def _new_slot_bytes(min_bytes: int) -> int:
    """The size a new slot for batches of ``min_bytes`` gets: room to grow, rounded."""
    return max(_ROUND, -(-int(min_bytes * _GROWTH) // _ROUND) * _ROUND)
