"""A server killed mid-epoch and restarted: the client continues with nothing lost or repeated."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from batchferry import errors, shm
from batchferry.client import DataLoader, connection
from batchferry.client import stream as stream_mod
from batchferry.client.segments import SegmentCache
from batchferry.server import parse_spec

from checks import assert_same
from processes import ServeProcess, back_after, wait_until
from toy_datasets import RESTART_SPEC

SPEC = RESTART_SPEC  # served as "syn" by the restartable fixture


@pytest.mark.parametrize("transport", ["shm", "grpc"])
@pytest.mark.parametrize("stop", ["kill", "stop"])  # kill -9, or SIGTERM as a rolling restart sends
def test_server_restart_mid_epoch_loses_and_repeats_nothing(
    restartable: ServeProcess, transport: str, stop: str
) -> None:
    ds = parse_spec(SPEC)
    expected = list(TorchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(9)))
    with DataLoader(
        f"127.0.0.1:{restartable.port}", "syn", 16, True, seed=9, timeout=30, transport=transport
    ) as loader:
        it = iter(loader)
        got = [next(it) for _ in range(5)]
        getattr(restartable, stop)()  # the stream is live: a SIGTERM'd server ends it with UNAVAILABLE
        with back_after(1.0, restartable.start):  # the server is away for a while
            got += list(it)  # blocks while the server is away, then continues
    assert_same(got, expected)


def test_a_frame_read_after_the_server_died_and_its_slots_went_is_read_again(
    restartable: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frame the server sent just before kill -9 may be read after its reaper unlinked
    the slot it names: the server is gone, so the loader reconnects (never a protocol
    error) and the batch comes again from the restarted server."""
    ds = parse_spec(SPEC)
    expected = list(TorchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(9)))
    held, go = threading.Event(), threading.Event()
    slots: list[str] = []
    from_slot = stream_mod.EpochStream._from_slot

    def gated(self: stream_mod.EpochStream, header: Any) -> Any:
        if not slots:  # the first frame read after the gate is set waits here
            slots.append(header.slot)
            held.set()
            go.wait(30)
        return from_slot(self, header)

    with DataLoader(restartable.address, "syn", 16, True, seed=9, timeout=30, transport="shm") as loader:
        it = iter(loader)
        got = [next(it) for _ in range(3)]
        monkeypatch.setattr(stream_mod.EpochStream, "_from_slot", gated)
        while not wait_until(held.is_set, timeout=1):
            got.append(next(it))
        restartable.kill()
        assert wait_until(lambda: not (shm.SHM_DIR / slots[0]).exists())  # the reaper's work
        go.set()
        with back_after(0.5, restartable.start):
            got += list(it)
        assert loader.stats().reconnects == 1
    assert_same(got, expected)


def test_a_slot_missing_on_a_live_server_is_a_malformed_stream(
    restartable: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart: while the server lives, a slot it names that cannot be mapped is
    its fault, reported as such, not retried by reconnecting."""

    def gone(self: SegmentCache, name: str) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(SegmentCache, "map", gone)
    with DataLoader(restartable.address, "syn", 16, timeout=30, transport="shm") as loader:
        with pytest.raises(errors.ProtocolError, match="cannot map slot"):
            list(loader)
        assert loader.stats().reconnects == 0


def test_a_server_back_on_another_transport_is_read_by_as_many_streams(
    restartable: ServeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same host at first (one stream); the restarted server's memory is not visible any
    more (a container restarted into a new IPC namespace): the byte stream, which would
    take two stripes at iter(), carries the rest of the epoch on the epoch's one stream."""
    ds = parse_spec(SPEC)
    expected = list(TorchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(9)))
    with DataLoader(f"127.0.0.1:{restartable.port}", "syn", 16, True, seed=9, timeout=30) as loader:
        it = iter(loader)
        got = [next(it) for _ in range(5)]
        assert loader.transport == "shm" and loader.stripes == 1
        restartable.kill()
        monkeypatch.setattr(connection, "probe", lambda name, token: False)
        restartable.start()
        got += list(it)
        assert loader.transport == "grpc" and loader.stripes == 2  # for the next epoch
    assert_same(got, expected)


def test_sharded_rank_continues_after_restart(restartable: ServeProcess) -> None:
    ds = parse_spec(SPEC)
    sampler = DistributedSampler(ds, 2, 1, shuffle=True, seed=1)  # type: ignore[arg-type]
    expected = list(TorchLoader(ds, 8, sampler=sampler))  # type: ignore[arg-type]
    kw = {"mode": "sharded", "job": "ddp", "rank": 1, "world_size": 2, "seed": 1, "timeout": 30}
    with DataLoader(f"127.0.0.1:{restartable.port}", "syn", 8, True, **kw) as loader:  # type: ignore[arg-type]
        it = iter(loader)
        got = [next(it) for _ in range(3)]
        restartable.kill()
        restartable.start()
        got += list(it)
    assert_same(got, expected)


def test_server_that_stays_away_raises_after_timeout(restartable: ServeProcess) -> None:
    with DataLoader(f"127.0.0.1:{restartable.port}", "syn", 16, timeout=1.5) as loader:
        it = iter(loader)
        next(it)
        restartable.kill()
        start = time.monotonic()
        with pytest.raises(errors.ServerUnavailable, match="did not come back"):
            list(it)
        assert time.monotonic() - start < 15


def test_a_server_that_comes_up_after_a_failed_iter_is_found_within_timeout() -> None:
    """A failed iter() leaves no reconnect backoff behind: the next one waits for the
    server no longer than its timeout, however long the loader waited before."""
    server = ServeProcess(f"syn={SPEC}")
    with DataLoader(server.address, "syn", 16, timeout=2) as loader:
        with pytest.raises(errors.ServerUnavailable, match="not reachable"):
            iter(loader)  # nothing listens yet
        server.start()
        try:
            assert len(list(loader)) == 19
        finally:
            server.stop()
