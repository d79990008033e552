"""Shared and dynamic jobs across a server killed (-9) and restarted on the same port.

The two kill-and-restart tests run ``BATCHFERRY_RESTART_RUNS`` times (default 20): the
defects they guard against showed in about 2 runs of 5."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from batchferry import cli
from batchferry.client import merge_states
from batchferry.server import Server
from batchferry.server.jobs import JobRegistry, JobSettings
from batchferry.server.journal import COMPACT_MIN_BYTES, StateDir
from batchferry.server.modes.dynamic import MAX_EPOCH_TOKENS, DynamicEpoch
from batchferry.server.status import Abort
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from processes import ServeProcess
from restart_data import SAMPLES, ids, ids_file, loader, serving, torch_epoch

RUNS = int(os.environ.get("BATCHFERRY_RESTART_RUNS", "20"))
# A dynamic job's settings, for journals written by hand.
JOURNALED = JobSettings(
    mode=pb.MODE_DYNAMIC, dataset="ids", batch_size=5, shuffle=True, drop_last=False,
    collate="default", seed=7, world_size=1,
)  # fmt: skip


def _take(its: list[Any], counts: list[int]) -> list[list[Any]]:
    """``counts[k]`` batches from iterator k, taken in turn."""
    got: list[list[Any]] = [[] for _ in its]
    for step in range(max(counts)):
        for k, it in enumerate(its):
            if step < counts[k]:
                got[k].append(next(it))
    return got


def _rest(its: list[Any]) -> list[list[Any]]:
    """The rest of each iterator, read at once on threads of their own."""
    return _rest_across_restart(its, None)


def _rest_across_restart(its: list[Any], server: ServeProcess | None) -> list[list[Any]]:
    """Kill the server, and read the rest of each iterator on threads of their own while
    it starts again (each consumer reconnects when it finds it back)."""
    if server is not None:
        server.kill()
    got: list[list[Any]] = [[] for _ in its]
    errors: list[BaseException] = []

    def read(k: int) -> None:
        try:
            got[k].extend(its[k])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(len(its))]
    for t in threads:
        t.start()
    if server is not None:
        server.start()
    for t in threads:
        t.join(timeout=90)
    if errors:
        raise errors[0]
    return got


@pytest.mark.parametrize("run", range(RUNS))
def test_shared_consumers_each_get_the_epoch_once_across_a_restart(tmp_path: Path, run: int) -> None:
    expected = torch_epoch()
    with serving(tmp_path) as server:
        loaders = [loader(server.address, "shared", "s") for _ in range(2)]
        try:
            its = [iter(ld) for ld in loaders]
            head = _take(its, [8, 6])  # different positions, batches in flight
            tail = _rest_across_restart(its, server)
            for seq, rest in zip(head, tail, strict=True):
                assert_same(seq + rest, expected)
        finally:
            for ld in loaders:
                ld.close()


@pytest.mark.parametrize("run", range(RUNS))
def test_dynamic_consumers_share_the_epoch_once_across_a_restart(tmp_path: Path, run: int) -> None:
    with serving(tmp_path, ["--state-dir", str(tmp_path / "state")]) as server:
        loaders = [loader(server.address, "dynamic", "d") for _ in range(2)]
        try:
            its = [iter(ld) for ld in loaders]
            head = _take(its, [8, 5])
            tail = _rest_across_restart(its, server)
        finally:
            for ld in loaders:
                ld.close()
    got = ids([b for seq in head + tail for b in seq])
    assert sorted(got) == list(range(SAMPLES))


def test_a_dynamic_job_resumed_from_a_checkpoint_repeats_what_came_after_it(tmp_path: Path) -> None:
    with Server({"ids": f"npy:{ids_file(tmp_path)}"}, port=0, num_workers=1, rejoin_s=1.0) as srv:
        before = [loader(srv.address, "dynamic", "ckpt") for _ in range(2)]
        its = [iter(ld) for ld in before]
        head = _take(its, [6, 4])
        states = [ld.state_dict() for ld in before]
        _take(its, [5, 3])  # taken after the checkpoint: the job loses them when it restarts from it
        for ld in before:
            ld.close()
        after = [loader(srv.address, "dynamic", "ckpt") for _ in range(2)]
        try:
            for ld, state in zip(after, states, strict=True):
                ld.load_state_dict(state)
            rest = _rest([iter(ld) for ld in after])
        finally:
            for ld in after:
                ld.close()
    assert sorted(ids([b for seq in head + rest for b in seq])) == list(range(SAMPLES))


@pytest.mark.parametrize("where", ["nothing taken", "an epoch's end"])
def test_a_dynamic_job_resumed_from_a_checkpoint_with_nothing_taken_gets_the_whole_epoch(
    tmp_path: Path, where: str
) -> None:
    """The checkpoint holds no batch of the epoch (saved before the first, or after the
    last of the one before); what the dead consumers took after it comes again."""
    with Server({"ids": f"npy:{ids_file(tmp_path)}"}, port=0, num_workers=1, rejoin_s=1.0) as srv:
        before = [loader(srv.address, "dynamic", "ckpt0") for _ in range(2)]
        if where == "an epoch's end":
            _rest([iter(ld) for ld in before])
        its = [iter(ld) for ld in before]
        states = [ld.state_dict() for ld in before]  # the epoch begun (its batches on the way), or not
        _take(its, [5, 3])  # taken after the checkpoint: the job loses them when it restarts from it
        for ld in before:
            ld.close()
        epoch = 1 if where == "an epoch's end" else 0
        after = [loader(srv.address, "dynamic", "ckpt0") for _ in range(2)]
        try:
            for ld in after:
                ld.load_state_dict(merge_states(states))
            assert all(ld.epoch == epoch for ld in after)
            rest = _rest([iter(ld) for ld in after])
        finally:
            for ld in after:
                ld.close()
    got = ids([b for seq in rest for b in seq])
    assert sorted(got) == list(range(SAMPLES))


def test_batches_of_a_consumer_that_never_comes_back_go_to_others_after_the_grace(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with serving(tmp_path, ["--state-dir", str(state), "--rejoin-s", "1"]) as server:
        stays, goes = loader(server.address, "dynamic", "gone"), loader(server.address, "dynamic", "gone")
        try:
            its = [iter(stays), iter(goes)]
            head = _take(its, [6, 4])
            server.kill()
            goes.close()  # its trainer died with the server: it never reconnects
            (journal,) = state.glob("*.journal")
            with journal.open("ab") as f:
                f.write(b'{"e":0,"h":[5')  # a line half written when the server was killed
            server.start()
            rest = list(its[0])
        finally:
            stays.close()
            goes.close()
    # What the lost consumer had (taken or in flight) went to the one that stayed.
    assert sorted(ids(head[0] + rest)) == list(range(SAMPLES))
    assert set(ids(head[1])) <= set(ids(rest))


def test_a_journal_skips_a_torn_last_line_and_appends_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = JOURNALED
    state = StateDir(str(tmp_path), max_files=4)
    journal = state.open("job", settings, 8)
    journal.begin(0, 10)
    journal.handed(0, [0, 1], b"\x01")
    journal.handed(0, [2], b"\x02")
    journal.back(0, [1])
    journal.done(0, [2])
    journal.close()
    with state.file("job").open("ab") as f:
        f.write(b'{"e":0,"h":[3],"u":"0')  # killed mid-write
    with caplog.at_level(logging.WARNING, "batchferry.server"):
        journal = state.open("job", settings, 8)
    assert any("skipped" in r.getMessage() for r in caplog.records)
    journal.handed(0, [4], b"\x01")
    journal.close()
    again = state.open("job", settings, 8).take(0, 10)
    assert again is not None
    assert (again.holder, again.done, again.tokens) == ({0: "01", 4: "01"}, {2}, {"01", "02"})
    # Another job's settings under the same name: nothing of it is taken up.
    other = state.open("job", replace(settings, batch_size=6), 8)
    assert other.take(0, 10) is None
    other.close()
    state.close()


def test_a_journal_stays_bounded_while_consumers_come_and_go(tmp_path: Path) -> None:
    """Consumers that take a batch and leave, again and again, add lines to one epoch
    without end: the journal compacts as they pile up, and keeps the ledger exact."""
    state = StateDir(str(tmp_path), max_files=4)
    registry = JobRegistry(state=state)
    job, consumer = registry.join("job", JOURNALED, "peer", 0, 0)
    epoch = job.epoch_state(0, lambda: DynamicEpoch(64, job.cond, epoch=0, journal=job.journal))
    assert isinstance(epoch, DynamicEpoch)
    tokens = [bytes([k]) * 16 for k in range(1, 9)]
    largest = 0
    for n in range(30_000):
        epoch.enter(consumer.id, tokens[n % len(tokens)], np.array([], dtype=np.int64), False)
        position = epoch.take(consumer.id)
        assert position is not None
        if n % 1000 == 0:
            epoch.ack(consumer.id, position)  # done for good when the consumer leaves
        epoch.depart(consumer.id)  # the rest goes back to the queue
        largest = max(largest, state.file("job").stat().st_size)
    # Some 2 MB of lines went out; the file never held more than one compaction's allowance.
    assert largest <= COMPACT_MIN_BYTES + 4096
    expected = epoch.record()
    registry.close()
    again = StateDir(str(tmp_path), max_files=4)
    back = again.open("job", JOURNALED, 8).take(0, 64)
    again.close()
    assert back is not None
    assert (back.holder, back.done, back.tokens) == (expected.holder, expected.done, expected.tokens)
    assert len(back.done) == 30


def test_an_epoch_takes_a_bounded_number_of_loaders(tmp_path: Path) -> None:
    """Every token an epoch has seen is remembered (and journaled): one loader more than
    it takes is refused by name, while a loader it knows still comes back."""
    registry = JobRegistry(state=StateDir(str(tmp_path), max_files=4))
    job, consumer = registry.join("job", JOURNALED, "peer", 0, 0)
    epoch = job.epoch_state(0, lambda: DynamicEpoch(8, job.cond, epoch=0, journal=job.journal))
    assert isinstance(epoch, DynamicEpoch)
    nothing = np.array([], dtype=np.int64)
    for n in range(MAX_EPOCH_TOKENS):
        epoch.enter(consumer.id, n.to_bytes(16, "big"), nothing, False)
        epoch.depart(consumer.id)
    with pytest.raises(Abort, match=f"has had {MAX_EPOCH_TOKENS} loaders") as refused:
        epoch.enter(consumer.id, MAX_EPOCH_TOKENS.to_bytes(16, "big"), nothing, False)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    epoch.enter(consumer.id, (7).to_bytes(16, "big"), nothing, False)
    assert epoch.take(consumer.id) == 0
    registry.close()


@pytest.mark.parametrize(
    "line",
    [b'{"e":0}', b"[" * 100_000 + b"]" * 100_000, b'{"e":0,"h":[3],"u":"not-hex"}', b"\xff\xfe"],
    ids=["no change", "nested deep", "token not hex", "not text"],
)
def test_a_journal_line_that_is_not_one_is_skipped(tmp_path: Path, line: bytes) -> None:
    settings = JOURNALED
    state = StateDir(str(tmp_path), max_files=4)
    journal = state.open("job", settings, 8)
    journal.begin(0, 10)
    journal.handed(0, [0], b"\x01")
    journal.close()
    with state.file("job").open("ab") as f:
        f.write(line + b"\n" + b'{"e":0,"d":[0]}\n')
    again = state.open("job", settings, 8).take(0, 10)
    state.close()
    assert again is not None
    assert (again.holder, again.done) == ({}, {0})


def test_a_state_dir_serves_one_server_at_a_time(tmp_path: Path) -> None:
    ds = {"t": torch.utils.data.TensorDataset(torch.arange(4))}
    with Server(ds, port=0, num_workers=0, state_dir=str(tmp_path)):
        with pytest.raises(ValueError, match=r"state_dir .* is in use by another running server"):
            Server(ds, port=0, num_workers=0, state_dir=str(tmp_path))
    with Server(ds, port=0, num_workers=0, state_dir=str(tmp_path)):
        pass  # the first let go when it closed


def test_a_state_dir_that_cannot_be_written_is_refused_at_startup(tmp_path: Path, capsys: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    ds = {"t": torch.utils.data.TensorDataset(torch.arange(4))}
    with pytest.raises(ValueError, match=r"state_dir .* is not a writable directory"):
        Server(ds, port=0, num_workers=0, state_dir=str(blocker / "state"))
    assert (
        cli.main(["serve", "--dataset", "t=synthetic:n=4", "--port", "0", "--state-dir", str(blocker)]) == 2
    )
    assert "state_dir" in capsys.readouterr().err
