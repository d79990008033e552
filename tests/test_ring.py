"""The slot ring's lease state machine: one state per slot, a budget that counts every segment."""

from __future__ import annotations

import errno
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    precondition,
    rule,
)

from batchferry import shm
from batchferry.server.ring import Lease, RingExhausted, SlotRing, SlotState

from processes import wait_until

MIB = 1 << 20
BUDGET = 8 * MIB


class RingMachine(RuleBasedStateMachine):
    """Random acquires, releases, detaches, abandons and client mappings against the invariants."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.ring = SlotRing(2, BUDGET, linger=0.0)
        self.active: set[Lease] = set()
        self.ended: list[Lease] = []
        self.seen: set[str] = set(self.ring.segment_names())
        self.gone: set[str] = set()  # names that left the ring: never leased again
        self.mapped: list[shm.Segment] = []  # a client's mappings (shared locks)

    @rule(target=leases, size=st.sampled_from([MIB // 2, MIB, 3 * MIB, 5 * MIB]))
    def acquire(self, size: int) -> object:
        lease = self.ring.acquire(size, timeout=0)
        if lease is None:
            return multiple()  # nothing free that fits now
        assert lease.capacity >= size
        assert lease.name not in self.gone, "a slot that left the ring was leased again"
        assert all(lease.segment is not other.segment for other in self.active)
        self.active.add(lease)
        return lease

    @rule(lease=consumes(leases), how=st.sampled_from(["release", "detach", "abandon"]))
    def end(self, lease: Lease, how: str) -> None:
        getattr(lease, how)()
        self.active.discard(lease)
        self.ended.append(lease)
        assert not lease.active

    @precondition(lambda self: bool(self.ended))
    @rule(data=st.data(), how=st.sampled_from(["release", "detach", "abandon"]))
    def end_again(self, data: st.DataObject, how: str) -> None:
        """An ended lease can never move its slot again, whoever holds it now."""
        lease = data.draw(st.sampled_from(self.ended))
        before = self._states()
        getattr(lease, how)()
        assert self._states() == before

    @precondition(lambda self: bool(self.active))
    @rule(data=st.data())
    def client_maps(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(sorted(self.active, key=lambda lease: lease.name)))
        self.mapped.append(shm.Segment.attach(lease.name, shared_lock=True))

    @precondition(lambda self: bool(self.mapped))
    @rule(data=st.data())
    def client_unmaps(self, data: st.DataObject) -> None:
        seg = self.mapped.pop(data.draw(st.integers(0, len(self.mapped) - 1)))
        seg.close()

    def _states(self) -> dict[SlotState, int]:
        return dict(self.ring.stats().slots)

    @invariant()
    def budget_holds_and_every_segment_is_counted(self) -> None:
        stats = self.ring.stats()
        assert stats.total_bytes <= BUDGET
        assert stats.slots[SlotState.LEASED] == len(self.active)
        assert stats.slots[SlotState.LINGERING] == 0  # linger=0: they retire at the next look
        live = {p.name for p in shm.SHM_DIR.iterdir() if p.name.startswith(f"{shm.PREFIX}{self.ring.token}_")}
        in_ring = set(self.ring.segment_names())
        assert in_ring == live, "a segment is in /dev/shm but not in the ring, or the reverse"
        self.gone |= self.seen - in_ring
        self.seen |= in_ring
        assert not in_ring & self.gone, "a name that left the ring came back"
        # Retired segments still mapped by the client count; unmapped ones are gone.
        mapped_retired = {s.name for s in self.mapped if s.name in self.gone}
        assert stats.slots[SlotState.RETIRED] == len(mapped_retired)

    def teardown(self) -> None:
        for seg in self.mapped:
            seg.close()
        self.ring.close()
        assert not any(p.name.startswith(f"{shm.PREFIX}{self.ring.token}") for p in shm.SHM_DIR.iterdir())


RingMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_ring_state_machine = RingMachine.TestCase


def test_a_batch_larger_than_the_budget_is_refused_naming_both() -> None:
    ring = SlotRing(2, 4 * MIB)
    try:
        with pytest.raises(
            RingExhausted, match=rf"a batch of {5 * MIB} bytes does not fit .* {4 * MIB} bytes"
        ):
            ring.acquire(5 * MIB, timeout=0)
    finally:
        ring.close()


def test_a_full_dev_shm_leaves_the_ring_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = SlotRing(2, 64 * MIB)
    try:
        before = ring.stats()
        names = ring.segment_names()

        def full(size: int) -> shm.Segment:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ring._arena, "create", full)
        with pytest.raises(
            RingExhausted, match=r"/dev/shm is full .* a batch of 4194304 bytes \(budget 67108864"
        ):
            ring.acquire(4 * MIB, timeout=0)  # needs a larger slot than any free one
        assert ring.stats() == before and ring.segment_names() == names
        monkeypatch.undo()
        lease = ring.acquire(MIB // 2, timeout=0)  # the ring still works
        assert lease is not None
        lease.release()
    finally:
        ring.close()


def test_retired_memory_counts_until_the_last_client_mapping_goes() -> None:
    ring = SlotRing(1, 4 * MIB)
    try:
        lease = ring.acquire(MIB, timeout=0)
        assert lease is not None
        client = shm.Segment.attach(lease.name, shared_lock=True)
        lease.detach()  # the client keeps the batch
        assert ring.stats().slots[SlotState.RETIRED] == 1
        assert not (shm.SHM_DIR / lease.name).exists()
        client.close()
        assert ring.stats().slots[SlotState.RETIRED] == 0
    finally:
        ring.close()


def test_a_freed_slot_goes_to_a_stream_waiting_for_one_before_a_busy_stream() -> None:
    # A busy stream (builds in flight) asks without waiting; an idle one waits. Were the
    # busy one served first it could take every freed slot and starve the other.
    ring = SlotRing(1, 4 * MIB, max_slots=1)
    waited: list[Lease | None] = []
    try:
        held = ring.acquire(MIB, timeout=0)
        assert held is not None
        waiter = threading.Thread(target=lambda: waited.append(ring.acquire(MIB, timeout=30)))
        waiter.start()
        assert wait_until(lambda: ring.waiting == 1)
        held.release()
        assert ring.acquire(MIB, timeout=0) is None  # the waiter's turn
        waiter.join(30)
        assert waited and waited[0] is not None
        waited[0].release()
        assert ring.waiting == 0
        again = ring.acquire(MIB, timeout=0)  # nobody waits: served at once
        assert again is not None
        again.release()
    finally:
        ring.close()
