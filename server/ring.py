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

Hoards: a LEASED slot sent to a client to map (:meth:`Lease.hold`) may be taken out of
the ring (*reclaimed*) while another stream waits: it stays LEASED and its name
valid, so the client reads it intact, but it is never reused; the ring allocates a
replacement within the budget, and the slot retires when the client lets go. A
stream waiting for a slot is served before streams that lease more (fewest leases
first, then first come), and one that leases nothing adds a slot at once where the
ring may grow. The ring reclaims only from a stream holding more than its hold
share (:meth:`SlotRing.hold_share`). Every wait is timed per stream (:class:`Owner`),
with the stream whose hoard it waited on, for metrics.

Budget: the bytes of every live segment, in every state, never exceed ``max_bytes``.
Slots out of the ring (reclaimed, LINGERING, RETIRED still mapped) count too; while
they take half of it or more, the ring lends no slot to be held (:meth:`SlotRing.lends`:
streams then send copies on the byte stream), so kept batches can never crowd out
the ring that every stream builds in.
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

__all__ = [
    "KEPT_SHARE",
    "WAIT_SLACK",
    "Lease",
    "Owner",
    "RingExhausted",
    "SlotRing",
    "SlotState",
    "wait_bound",
]

_GROWTH = 1.25
_ROUND = 1 << 20
# How long a stream waits with every slot leased before the ring adds one.
_ADD_AFTER = 0.5
_WAIT = 0.05  # seconds between looks at lingering and retired slots while waiting
_PROBE_BYTES = 16
# Of the budget, what slots out of the ring (batches clients keep mapped) may take before
# the ring lends no more slots to hold: the rest stays the ring's to build in.
KEPT_SHARE = 0.5
# The stated bound on a stream's wait for a slot, beyond the longest build in progress
# (that build's slot is the one it may wait for): turns, wake-ups and a busy host.
WAIT_SLACK = 1.0


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
    held: bool = False  # LEASED: mapped by a client, not being built into
    reclaimed: bool = False  # LEASED, out of the ring: retires when its lease ends

    @property
    def capacity(self) -> int:
        return self.segment.size


class Owner:
    """One stream's account at the ring: its leases, and its wait for a slot if any."""

    def __init__(self, label: str) -> None:
        self.label = label  # names the stream in metrics and logs
        self.leases = 0
        self.held = 0  # of which mapped by its client
        self.waiting_since: float | None = None
        self.blocked_by: str = ""  # the largest holder while it waited (label)
        self.reclaimed = 0  # slots the ring took out of this stream's hoard


_NOBODY = Owner("")


class Lease:
    """One acquisition of one slot: the only handle that can give it back."""

    __slots__ = ("_owner", "_ring", "_slot")

    def __init__(self, ring: SlotRing, slot: _Slot, owner: Owner) -> None:
        self._ring = ring
        self._slot = slot
        self._owner = owner

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

    def hold(self) -> None:
        """The slot is sent to a client that maps it: the ring may reclaim it for a stream
        that waits while this one holds more than its share."""
        self._ring._hold(self)

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
    reclaimed: int = 0  # LEASED slots taken out of the ring, until their clients let go
    kept_bytes: int = 0  # of every slot out of the ring: what KEPT_SHARE bounds

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
        # Blocked acquires in arrival order (seq, owner): served fewest leases first.
        self._queue: list[tuple[int, Owner]] = []
        self._seq = 0
        self._owners: set[Owner] = set()  # open streams
        self.reclaimed_total = 0
        # Told of every blocked acquire once it ends: (owner, seconds waited, whose hoard).
        self.on_wait: Callable[[Owner, float, str], None] | None = None
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
            out.reclaimed = sum(s.reclaimed for s in self._slots)
            out.kept_bytes = self._kept()
            return out

    # -- streams and their hoards ---------------------------------------------------------
    def open_owner(self, label: str) -> Owner:
        """An account for one stream (its leases and waits); :meth:`close_owner` at its end."""
        owner = Owner(label)
        with self._cond:
            self._owners.add(owner)
        return owner

    def close_owner(self, owner: Owner) -> None:
        with self._cond:
            self._owners.discard(owner)
            self._cond.notify_all()

    def owners(self) -> list[Owner]:
        """The open streams' accounts (for metrics: who holds what, who waits)."""
        with self._cond:
            return list(self._owners)

    def lends(self) -> bool:
        """Whether a slot may be sent to a client to hold: slots out of the ring take less
        than ``KEPT_SHARE`` of the budget (else the stream sends a copy)."""
        with self._cond:
            self._sweep()
            return self._lending()

    def _lending(self) -> bool:
        return self._kept() < KEPT_SHARE * self.max_bytes

    def hold_share(self, slot_bytes: int) -> int:
        """Slots of ``slot_bytes`` one stream's client may hold now: with every open stream
        holding this many, each still has one to build in (0 while the ring lends none).
        Asked per batch sent, so it does not sweep: the acquire before it just did."""
        with self._cond:
            return self._share_of(slot_bytes) if self._lending() else 0

    def _kept(self) -> int:
        return sum(s.capacity for s in self._slots if s.reclaimed or s.state in _OUT)

    def segment_names(self) -> list[str]:
        with self._cond:
            names = [s.segment.name for s in self._slots if s.state is not SlotState.RETIRED]
            return [self.probe_name, *names]

    def _ring(self) -> list[_Slot]:
        return [s for s in self._slots if s.state in (SlotState.FREE, SlotState.LEASED) and not s.reclaimed]

    def _used(self) -> int:
        return _PROBE_BYTES + sum(s.capacity for s in self._slots)

    # -- leases -----------------------------------------------------------------------
    def acquire(
        self,
        min_bytes: int,
        *,
        timeout: float,
        cancelled: Callable[[], bool] = lambda: False,
        owner: Owner = _NOBODY,
    ) -> Lease | None:
        """A lease on a slot of at least ``min_bytes``, for ``owner``'s stream.

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
                return self._lease(self._take(min_bytes, waited=0.0), owner)
        with self._cond:
            self._waiting += 1
            self._seq += 1
            me = (self._seq, owner)
            self._queue.append(me)
            owner.waiting_since = start
        try:
            while True:
                # ``cancelled`` asks the stream (gRPC's own locks): never under ``_cond``.
                if cancelled():
                    return None
                with self._cond:
                    if self._closed:
                        return None
                    self._sweep()
                    lease = self._queued_take(me, min_bytes, time.monotonic() - start)
                    if lease is not None:
                        return lease
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(min(remaining, _WAIT))
        finally:
            with self._cond:
                self._waiting -= 1
                self._queue.remove(me)
                owner.waiting_since = None
                waited = time.monotonic() - start
                self._cond.notify_all()  # the next in line may take what this one did not
            if self.on_wait is not None:
                self.on_wait(owner, waited, owner.blocked_by)

    def _queued_take(self, me: tuple[int, Owner], min_bytes: int, waited: float) -> Lease | None:
        """A slot for a blocked acquire whose turn it is (caller holds ``_cond``).

        Turns go fewest leases first, then first come: a stream holding nothing takes the
        next free slot before streams that hold some. A stream that leases less than its
        share and finds no slot adds one at once, or reclaims one of a hoard above share.
        """
        owner = me[1]
        line = sorted(self._queue, key=lambda w: (w[1].leases, w[0]))
        free = sum(s.state is SlotState.FREE for s in self._slots)
        if line.index(me) >= max(1, free):
            return None
        under_share = owner.leases <= self._share_of(min_bytes)
        lease = self._lease(self._take(min_bytes, waited=_ADD_AFTER if under_share else waited), owner)
        if lease is None and under_share and self._reclaim(owner):
            lease = self._lease(self._take(min_bytes, waited=_ADD_AFTER), owner)
        if lease is None:
            holder = max(self._owners, key=lambda o: o.held, default=None)
            owner.blocked_by = holder.label if holder is not None and holder.held else ""
        return lease

    def _share_of(self, slot_bytes: int) -> int:
        """The hold share at ``slot_bytes`` (caller holds ``_cond``; see :meth:`hold_share`)."""
        return max(1, self.fits(slot_bytes) // max(1, len(self._owners)) - 1)

    def _reclaim(self, waiter: Owner) -> bool:
        """Take the oldest held slot of the stream holding most above its share out of the
        ring (caller holds ``_cond``): its client keeps reading it; a replacement may come."""
        over = [
            s for s in self._slots if s.held and not s.reclaimed and s.lease is not None
            and s.lease._owner is not waiter
            and s.lease._owner.held > self._share_of(s.capacity)
        ]  # fmt: skip
        if not over:
            return False
        by = max({s.lease._owner for s in over if s.lease is not None}, key=lambda o: o.held)
        slot = next(s for s in over if s.lease is not None and s.lease._owner is by)
        slot.reclaimed = True
        by.held -= 1
        by.leases -= 1
        by.reclaimed += 1
        self.reclaimed_total += 1
        self._cond.notify_all()
        return True

    @property
    def waiting(self) -> int:
        """Acquires blocked for a slot now."""
        with self._cond:
            return self._waiting

    def _lease(self, slot: _Slot | None, owner: Owner) -> Lease | None:
        """Lease ``slot`` (caller holds ``_cond``)."""
        if slot is None:
            return None
        slot.state, slot.lease = SlotState.LEASED, Lease(self, slot, owner)
        owner.leases += 1
        return slot.lease

    def _hold(self, lease: Lease) -> None:
        with self._cond:
            slot = lease._slot
            if slot.lease is lease and not slot.held and not slot.reclaimed:
                slot.held = True
                lease._owner.held += 1

    def fits(self, min_bytes: int) -> int:
        """How many slots for batches of ``min_bytes`` the ring can have: what the byte
        budget holds at the size a new slot gets, at most ``max_slots``. Slots out of the
        ring take their room until clients let go (at most ``KEPT_SHARE`` of it, see
        :meth:`lends`)."""
        with self._cond:
            room = self.max_bytes - min(self._kept(), int(KEPT_SHARE * self.max_bytes))
        return max(1, min(self.max_slots, room // _new_slot_bytes(min_bytes)))

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
            if not slot.reclaimed:  # a reclaimed slot left its owner's account then
                lease._owner.leases -= 1
                lease._owner.held -= slot.held
            slot.held = False
            if self._closed:
                return
            if slot.reclaimed and to is not SlotState.LINGERING:
                self._retire(slot)  # out of the ring: never FREE again
            elif to is SlotState.FREE:
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


_OUT = (SlotState.LINGERING, SlotState.RETIRED)


def wait_bound(build_seconds: float) -> float:
    """The longest a stream waits for a slot while the server is not overloaded: one
    build (the longest in progress, ``build_seconds``) plus ``WAIT_SLACK``."""
    return build_seconds + WAIT_SLACK


def _new_slot_bytes(min_bytes: int) -> int:
    """The size a new slot for batches of ``min_bytes`` gets: room to grow, rounded."""
    return max(_ROUND, -(-int(min_bytes * _GROWTH) // _ROUND) * _ROUND)
