"""A server killed mid-epoch and restarted: the client continues with nothing lost or repeated."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from batchferry import errors
from batchferry.client import DataLoader, connection
from batchferry.server import parse_spec

from checks import assert_same
from processes import ServeProcess
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
        restart = threading.Timer(1.0, restartable.start)  # the server is away for a while
        restart.start()
        got += list(it)  # blocks while the server is away, then continues
        restart.join()
    assert_same(got, expected)


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
