"""loader.stats(): counts equal what the loop got, waiting is told apart from working, log lines."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import TensorDataset

from batchferry import errors, layout
from batchferry.client import DataLoader, LoaderStats
from batchferry.client import connection as loader_mod
from batchferry.client.stats import LOG_STATS_ENV
from batchferry.server import Server

from processes import ServeProcess, back_after
from toy_datasets import Slow

# 256 samples of float32[16] and an int64 label: in batches of 16 every tensor is a
# multiple of 64 bytes, so the payload (64-byte aligned tensors) has no padding.
EXACT = TensorDataset(torch.randn(256, 16), torch.arange(256) % 10)
BATCHES = 16


def nbytes(batch: Any) -> int:
    return sum(t.nbytes for t in tree_leaves(batch) if isinstance(t, torch.Tensor))


def payload(batch: Any) -> int:
    """A batch's payload as laid out: each tensor on a 64-byte boundary, in order."""
    used = 0
    for t in tree_leaves(batch):
        used = layout.align(used) + t.nbytes
    return used


def consistent(s: LoaderStats) -> None:
    """What holds of any snapshot, however loaded the machine."""
    assert 0.0 <= s.stall_share <= 1.0
    assert 0.0 <= s.transform_s <= s.wait_s <= s.wall_s + 1e-6
    assert s.batches >= 0 and s.bytes >= 0 and s.reconnects >= 0 and s.epochs >= 0
    if s.wall_s > 0:
        assert s.stall_share == pytest.approx(min(1.0, s.wait_s / s.wall_s))
    assert len(s.transports) == 0 or set(s.transports) <= {"shm", "grpc"}


@pytest.fixture(scope="module")
def exact() -> Iterator[Server]:
    with Server({"exact": EXACT, "slow": Slow(n=24, delay=0.02)}, port=0, num_workers=1) as srv:
        yield srv


def test_nothing_counted_and_nothing_asked_before_the_first_iter() -> None:
    with DataLoader("127.0.0.1:1", "nobody-listens", 4) as loader:  # never connects
        s = loader.stats()
    assert s == LoaderStats(
        batches=0,
        bytes=0,
        wait_s=0.0,
        transform_s=0.0,
        wall_s=0.0,
        stall_share=0.0,
        epochs=0,
        first_batch_s=None,
        reconnects=0,
        transports=(),
        streams=0,
    )


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_counts_equal_what_was_iterated_over_epochs_and_a_break(exact: Server, transport: str) -> None:
    with DataLoader(exact.address, "exact", 16, shuffle=True, seed=1, transport=transport) as loader:
        got = list(loader)  # a whole epoch
        for i, batch in enumerate(loader):  # half of the next
            got.append(batch)
            if i == 4:
                break
        s = loader.stats()
    consistent(s)
    assert s.batches == len(got) == BATCHES + 5
    assert s.bytes == sum(nbytes(b) for b in got) == (BATCHES + 5) * 16 * (16 * 4 + 8)
    assert s.epochs == 2 and s.reconnects == 0 and s.transform_s == 0.0
    assert s.transports == (transport,)
    assert s.streams == (1 if transport == "shm" else 2)  # the byte stream is striped by default
    assert s.first_batch_s is not None and 0 < s.first_batch_s <= s.wall_s
    assert s.wait_s > 0  # opening two epochs' streams at least


def test_padding_between_tensors_counts_as_payload(server: Server, tensor_ds: TensorDataset) -> None:
    # 103 samples in batches of 16: the last batch's float32[7, 4] ends off a 64-byte boundary.
    with DataLoader(server.address, "tensor", 16) as loader:
        got = list(loader)
        s = loader.stats()
    assert s.batches == len(got) == 7
    assert s.bytes == sum(payload(b) for b in got) == sum(nbytes(b) for b in got) + 128 - 112


def test_reset_begins_a_new_window(exact: Server) -> None:
    with DataLoader(exact.address, "exact", 16) as loader:
        list(loader)
        first = loader.stats(reset=True)
        empty = loader.stats()
        it = iter(loader)
        batch = next(it)
        one = loader.stats()
        rest = list(it)
        second = loader.stats(reset=True)
    for s in (first, empty, one, second):
        consistent(s)
    assert (first.batches, first.epochs) == (BATCHES, 1)
    assert (empty.batches, empty.bytes, empty.epochs, empty.wait_s) == (0, 0, 0, 0.0)
    assert empty.wall_s <= first.wall_s and empty.transports == first.transports
    assert (one.batches, one.bytes, one.epochs) == (1, nbytes(batch), 1)
    assert (second.batches, second.epochs) == (1 + len(rest), 1) == (BATCHES, 1)
    assert second.first_batch_s is not None and second.first_batch_s <= second.wall_s


def test_batch_transform_time_is_part_of_the_wait(exact: Server) -> None:
    def transform(batch: Any) -> Any:
        time.sleep(0.002)
        return batch

    with DataLoader(exact.address, "exact", 16, batch_transform=transform) as loader:
        list(loader)
        s = loader.stats()
    consistent(s)
    assert s.transform_s >= BATCHES * 0.002  # each sleep is inside the window
    assert s.wait_s >= s.transform_s


def test_a_batch_whose_transform_raised_is_not_counted(exact: Server) -> None:
    def transform(batch: Any) -> Any:
        if int(batch[1][0]) % 2:  # labels of odd first samples
            raise RuntimeError("augmentation failed")
        return batch

    handed = 0
    with DataLoader(exact.address, "exact", 16, shuffle=True, seed=5, batch_transform=transform) as loader:
        it = iter(loader)
        while True:
            try:
                batch = next(it)
            except RuntimeError:
                continue
            except StopIteration:
                break
            handed += 1
            assert int(batch[1][0]) % 2 == 0
        s = loader.stats()
    assert 0 < handed < BATCHES
    assert (s.batches, s.bytes) == (handed, handed * 16 * (16 * 4 + 8))


def test_windows_reset_from_another_thread_add_up_to_every_batch(exact: Server) -> None:
    windows: list[LoaderStats] = []
    stop = threading.Event()

    def reset() -> None:
        while not stop.is_set():
            windows.append(loader.stats(reset=True))

    with DataLoader(exact.address, "exact", 16) as loader:
        resetter = threading.Thread(target=reset)
        resetter.start()
        try:
            for _ in range(20):
                assert len(list(loader)) == BATCHES
        finally:
            stop.set()
            resetter.join()
        windows.append(loader.stats(reset=True))
    assert len(windows) > 20
    assert sum(w.batches for w in windows) == 20 * BATCHES
    assert sum(w.epochs for w in windows) == 20


def test_stall_share_tells_a_slow_server_from_a_slow_loop(exact: Server) -> None:
    # A server that sleeps 20 ms per sample and a loop that does nothing: all waiting.
    with DataLoader(exact.address, "slow", 4, prefetch_factor=2) as loader:
        assert len(list(loader)) == 6
        slow_server = loader.stats()
    # A ready server and a loop that sleeps 50 ms per step: it waits less than it sleeps.
    with DataLoader(exact.address, "exact", 16, prefetch_factor=4) as loader:
        it = iter(loader)
        next(it)
        loader.stats(reset=True)  # leave out opening the stream and the first build
        steps, slept = 10, 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            time.sleep(0.05)
            slept += time.perf_counter() - t0
            next(it)
        slow_loop = loader.stats()
    consistent(slow_server)
    consistent(slow_loop)
    assert slow_server.stall_share > 0.5
    assert slow_loop.batches == steps and slow_loop.wait_s < slept
    assert slow_server.stall_share > slow_loop.stall_share


def test_two_replicas_list_a_transport_each(monkeypatch: pytest.MonkeyPatch) -> None:
    with (
        Server({"exact": EXACT}, port=0, num_workers=0, replica_index=0, num_replicas=2) as a,
        Server({"exact": EXACT}, port=0, num_workers=0, replica_index=1, num_replicas=2) as b,
    ):
        with DataLoader([b.address, a.address], "exact", 16, seed=2, shuffle=True) as loader:
            got = list(loader)
            s = loader.stats()
        consistent(s)
        assert s.transports == ("shm", "shm") and s.streams == 1
        assert (s.batches, s.bytes) == (BATCHES, nbytes(got))

        # Replica 1 as if on another host: its shared memory is not visible from here.
        with DataLoader([a.address, b.address], "exact", 16) as loader:
            assert len(loader) == BATCHES  # finds the replicas
            hidden = loader._connection.replicas.replicas[1].info.shm_probe
            real = loader_mod.probe
            monkeypatch.setattr(loader_mod, "probe", lambda name, token: name != hidden and real(name, token))
            got = list(loader)
            s = loader.stats()
        consistent(s)
        assert loader.transport == "shm+grpc"
        assert s.transports == ("shm", "grpc") and s.streams == 2
        assert (s.batches, s.bytes) == (BATCHES, nbytes(got))


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_server_restart_counts_one_reconnect_and_its_wait(
    restartable: ServeProcess, transport: str
) -> None:
    with DataLoader(restartable.address, "syn", 16, timeout=30, transport=transport, streams=1) as loader:
        it = iter(loader)
        got = [next(it) for _ in range(5)]
        before = loader.stats()
        restartable.kill()
        with back_after(1.0, restartable.start):
            got += list(it)  # blocks in next() while the server is away
        s = loader.stats()
    consistent(s)
    assert before.reconnects == 0 and s.reconnects == 1
    assert s.batches == len(got) == 19 and s.bytes == sum(payload(b) for b in got)
    # The loop did nothing but wait for the server to come back, at least the restart's delay.
    assert s.wait_s - before.wait_s > 0.5


def test_as_dict_is_plain_and_complete(exact: Server) -> None:
    with DataLoader(exact.address, "exact", 16) as loader:
        list(loader)
        s = loader.stats()
    plain = json.loads(json.dumps(s.as_dict()))
    assert list(plain) == [f.name for f in fields(LoaderStats)]
    assert plain["transports"] == list(s.transports) and plain["batches"] == BATCHES
    with pytest.raises(AttributeError):
        s.batches = 0  # type: ignore[misc]


def _totals(records: list[logging.LogRecord]) -> list[tuple[int, int]]:
    """(interval batches, total batches) of each stats line."""
    out = []
    for record in records:
        found = re.search(r": (\d+) batches .*total: (\d+) batches", record.getMessage())
        assert found, record.getMessage()
        out.append((int(found[1]), int(found[2])))
    return out


def test_log_stats_every_logs_lines_of_their_own_window(
    exact: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchferry.client.stats")
    with DataLoader(exact.address, "exact", 16, log_stats_every=0.001) as loader:
        for _ in loader:
            time.sleep(0.002)  # an interval passes at every step
            loader.stats(reset=True)  # the caller's windows leave the log's alone
    records = [r for r in caplog.records if r.name == "batchferry.client.stats"]
    assert records and all(r.levelno == logging.INFO for r in records)
    assert all("'exact'" in r.getMessage() and "data stall" in r.getMessage() for r in records)
    counts = _totals(records)
    assert len(counts) >= BATCHES - 1
    running = 0
    for interval, total in counts:
        running += interval
        assert total == running
    assert counts[-1][1] <= BATCHES


def test_no_log_lines_unless_asked(
    exact: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LOG_STATS_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="batchferry.client.stats")
    with DataLoader(exact.address, "exact", 16) as loader:
        assert loader.config.log_stats_every == 0
        for _ in loader:
            time.sleep(0.001)
    assert not [r for r in caplog.records if r.name == "batchferry.client.stats"]


def test_log_interval_from_the_environment(
    exact: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOG_STATS_ENV, "0.001")
    caplog.set_level(logging.INFO, logger="batchferry.client.stats")
    with DataLoader(exact.address, "exact", 16) as loader:
        assert loader.config.log_stats_every == 0.001
        for _ in loader:
            time.sleep(0.002)
    assert [r for r in caplog.records if r.name == "batchferry.client.stats"]
    with DataLoader(exact.address, "exact", 16, log_stats_every=0) as loader:  # the argument wins
        assert loader.config.log_stats_every == 0


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), "30", True, [30]])
def test_a_bad_log_stats_every_is_refused_naming_it(value: Any) -> None:
    with pytest.raises(errors.InvalidArgument, match="log_stats_every"):
        DataLoader("127.0.0.1:1", "x", 4, log_stats_every=value)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_a_bad_environment_interval_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(LOG_STATS_ENV, value)
    with pytest.raises(errors.InvalidArgument, match=LOG_STATS_ENV):
        DataLoader("127.0.0.1:1", "x", 4)


@pytest.mark.parametrize("value", [0, 0.0, 2, 30.5])
def test_good_intervals_are_kept(value: float) -> None:
    with DataLoader("127.0.0.1:1", "x", 4, log_stats_every=value) as loader:
        assert loader.config.log_stats_every == value
