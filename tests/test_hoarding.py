"""Loaders that keep every batch they read (hoarders) cannot make another loader wait.

Eight same-host hoarders whose kept batches stay mapped (in-place copy-out
unavailable: the worst case) read beside a well-behaved loader reading epochs back
to back. Every blocked wait of the well-behaved loader for a ring slot stays within
the stated bound (``wait_bound`` of the longest build, server/ring.py), it never
times out, each of its epochs equals torch's, and every batch of every loader, the
hoarders' kept ones included, holds its own samples. The same holds for consumers
of a shared and of a dynamic job. ``BATCHFERRY_HOARD_SECONDS`` (default 8) sets how
long each round reads, ``BATCHFERRY_HOARD_ROUNDS`` (default 1) how many rounds run
in a row; the acceptance run is 60 s x 10.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import torch

from batchferry import shm
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.server.ring import Lease, Owner, SlotRing, wait_bound

from checks import assert_same, no_new_segments
from hoard_data import Rows, intact, start_hoarders, stop_hoarders
from processes import wait_until

SECONDS = float(os.environ.get("BATCHFERRY_HOARD_SECONDS", "8"))
ROUNDS = int(os.environ.get("BATCHFERRY_HOARD_ROUNDS", "1"))
BATCH = 64
# A small budget, so that the hoarders' kept batches would fill it within seconds.
BUDGET = 64 << 20


def _job(mode: str, rank: int, world: int) -> dict[str, Any]:
    if mode == "independent":
        return {}
    return {
        "mode": mode,
        "job": f"hoard-{mode}",
        "rank": rank,
        "world_size": world,
        "shuffle": True,
        "seed": 5,
    }


@pytest.mark.parametrize(("mode", "hoarders"), [("independent", 8), ("shared", 3), ("dynamic", 3)])
def test_hoarders_never_make_a_reading_loader_wait_beyond_the_bound(mode: str, hoarders: int) -> None:
    data = Rows()
    expected = list(torch.utils.data.DataLoader(data, BATCH))  # torch's epoch (independent, in order)
    for _ in range(ROUNDS):
        with no_new_segments():
            _round(data, expected, mode, hoarders)


def _round(data: Rows, expected: list[Any], mode: str, hoarders: int) -> None:
    with Server({"rows": data, "victim": data}, port=0, num_workers=2, shm_bytes=BUDGET) as srv:
        assert srv.service is not None
        service = srv.service
        waits: list[tuple[str, float, float, str]] = []
        told = srv.ring.on_wait

        def record(owner: Owner, seconds: float, by: str) -> None:
            waits.append((owner.label, seconds, service.counters.slowest, by))
            if told is not None:
                told(owner, seconds, by)

        srv.ring.on_wait = record
        world = hoarders + 1
        # Job consumers share one dataset name (every wait in the job counts); an
        # independent well-behaved loader reads its own name, to tell its waits apart.
        dataset = "rows" if mode != "independent" else "victim"
        stop, out, procs = start_hoarders(
            srv.address, "rows", BATCH, [_job(mode, r + 1, world) for r in range(hoarders)]
        )
        try:
            deadline = time.monotonic() + 120
            while service.open_streams < hoarders and time.monotonic() < deadline:
                time.sleep(0.05)  # they start
            epochs = 0
            with DataLoader(
                srv.address, dataset, BATCH, transport="shm", timeout=30, **_job(mode, 0, world)
            ) as loader:
                start = time.monotonic()
                while time.monotonic() - start < SECONDS:
                    got = list(loader)
                    assert all(intact(b) for b in got)
                    if mode == "independent":
                        assert_same(got, expected)
                    epochs += 1
        finally:
            results = stop_hoarders(stop, out, procs, hoarders)
    assert epochs >= 1
    assert len(results) == hoarders and all(kept > 0 and bad == 0 for kept, bad in results), results
    mine = [w for w in waits if w[0].endswith(" victim")] if mode == "independent" else waits
    over = [w for w in mine if w[1] > wait_bound(w[2])]
    assert not over, f"waits beyond the bound (stream, seconds, longest build, blocked by): {over}"


MIB = 1 << 20


def test_a_waiting_stream_reclaims_a_slot_held_above_share_and_the_holder_keeps_it_intact() -> None:
    ring = SlotRing(2, 4 * MIB, max_slots=2)
    try:
        hoarder, late = ring.open_owner("hoarder"), ring.open_owner("late")
        kept = [ring.acquire(MIB, timeout=1, owner=hoarder) for _ in range(2)]
        for k, lease in enumerate(kept):
            assert lease is not None
            lease.segment.array()[:8] = k + 1  # a batch its client maps and keeps
            lease.hold()
        # Both slots held, the ring at its size: the late stream reclaims one of them.
        lease = ring.acquire(MIB, timeout=5, owner=late)
        assert lease is not None and lease.name not in {k.name for k in kept if k is not None}
        stats = ring.stats()
        assert stats.reclaimed == 1 and stats.kept_bytes == MIB and ring.num_slots == 2
        assert [int(k.segment.array()[0]) for k in kept if k is not None] == [1, 2]  # never overwritten
        assert hoarder.reclaimed == 1 and late.leases == 1
        for k in kept:
            assert k is not None
            k.release()  # the reclaimed one retires rather than rejoining the ring
        assert ring.stats().reclaimed == 0 and ring.num_slots == 2
    finally:
        ring.close()


def test_slots_out_of_the_ring_may_take_half_the_budget_then_none_is_lent() -> None:
    ring = SlotRing(2, 4 * MIB)
    try:
        owner = ring.open_owner("keeper")
        assert ring.lends() and ring.hold_share(MIB) >= 1
        leases = [ring.acquire(MIB, timeout=1, owner=owner) for _ in range(2)]
        mappings = []
        for lease in leases:
            assert lease is not None
            mappings.append(shm.Segment.attach(lease.name, shared_lock=True))  # a client maps it...
            lease.detach()  # ...and keeps the batch
        assert ring.stats().kept_bytes == 2 * MIB and not ring.lends() and ring.hold_share(MIB) == 0
        for seg in mappings:
            seg.close()  # the client drops its batches
        assert ring.lends()
    finally:
        ring.close()


def test_a_stream_leasing_nothing_is_served_before_one_that_leases_more() -> None:
    ring = SlotRing(2, 4 * MIB, max_slots=2)
    try:
        busy, idle = ring.open_owner("busy"), ring.open_owner("idle")
        first, second = (ring.acquire(MIB, timeout=1, owner=busy) for _ in range(2))
        assert first is not None and second is not None
        got: dict[str, Lease | None] = {}

        def take(owner: Owner) -> None:
            got[owner.label] = ring.acquire(MIB, timeout=10, owner=owner)

        threads = [threading.Thread(target=take, args=(o,)) for o in (busy, idle)]
        threads[0].start()  # the busy stream waits first...
        assert wait_until(lambda: ring.waiting == 1)
        threads[1].start()
        assert wait_until(lambda: ring.waiting == 2)
        first.release()
        assert wait_until(lambda: "idle" in got)
        assert got["idle"] is not None and "busy" not in got  # ...the one leasing nothing goes first
        got["idle"].release()
        for t in threads:
            t.join(10)
        assert got["busy"] is not None
        got["busy"].release()
        second.release()
    finally:
        ring.close()
