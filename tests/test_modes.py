"""Jobs: sharded, shared and dynamic consumers of one server."""

from __future__ import annotations

import json
import re
import threading

import grpc
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from reading import in_step, read_concurrently


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sharded_ranks_equal_distributed_sampler(
    server: Server, tensor_ds, shuffle: bool, drop_last: bool
) -> None:
    world = 3
    loaders = [
        DataLoader(server.address, "tensor", 8, shuffle, seed=11, drop_last=drop_last, mode="sharded",
                   job=f"ddp-{shuffle}-{drop_last}", rank=r, world_size=world)
        for r in range(world)
    ]  # fmt: skip
    for epoch in range(2):
        for r, loader in enumerate(loaders):
            sampler = DistributedSampler(tensor_ds, world, r, shuffle=shuffle, seed=11, drop_last=drop_last)
            sampler.set_epoch(epoch)
            ref = list(TorchLoader(tensor_ds, 8, sampler=sampler, drop_last=drop_last))
            assert len(loader) == len(ref)
            assert_same(list(loader), ref)
    for loader in loaders:
        loader.close()


def test_sharded_set_epoch_and_resume(server: Server, tensor_ds) -> None:
    sampler = DistributedSampler(tensor_ds, 2, 1, shuffle=True, seed=3)
    sampler.set_epoch(4)
    ref = list(TorchLoader(tensor_ds, 5, sampler=sampler))
    kw = {"mode": "sharded", "job": "resume", "rank": 1, "world_size": 2, "seed": 3}
    with DataLoader(server.address, "tensor", 5, True, **kw) as loader:  # type: ignore[arg-type]
        loader.set_epoch(4)
        it = iter(loader)
        head = [next(it) for _ in range(4)]
        state = loader.state_dict()
    with DataLoader(server.address, "tensor", 5, True, **kw) as loader:  # type: ignore[arg-type]
        loader.load_state_dict(state)
        assert_same(head + list(loader), ref)


def test_conflicting_job_settings_are_refused(server: Server) -> None:
    first = DataLoader(
        server.address, "tensor", 8, True, seed=1, mode="sharded", job="pinned", rank=0, world_size=2
    )
    it = iter(first)
    next(it)  # the job now exists with these settings
    for kwargs, field in [
        ({"batch_size": 4}, "batch_size"),
        ({"seed": 2}, "seed"),
        ({"world_size": 4, "rank": 1}, "world_size"),
        ({"mode": "dynamic"}, "mode"),
        ({"dataset": "plain"}, "dataset"),
    ]:
        args = {
            "dataset": "tensor",
            "batch_size": 8,
            "seed": 1,
            "mode": "sharded",
            "rank": 1,
            "world_size": 2,
        }
        args.update(kwargs)
        dataset = args.pop("dataset")
        other = DataLoader(server.address, dataset, shuffle=True, job="pinned", **args)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgument, match=f"job 'pinned' has {field}"):
            next(iter(other))
        other.close()
    first.close()


def test_job_mode_arguments_are_checked(server: Server) -> None:
    for kwargs, needle in [
        ({"mode": "sharded"}, "job"),
        ({"mode": "sharded", "job": "j", "rank": 2, "world_size": 2}, "rank"),
        ({"mode": "sharded", "job": "j", "world_size": 0}, "world_size"),
        ({"mode": "shared", "job": "j", "generator": torch.Generator()}, "seed="),
    ]:
        with pytest.raises(errors.InvalidArgument, match=needle):
            DataLoader(server.address, "tensor", 4, **kwargs)  # type: ignore[arg-type]
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        opened = pb.OpenStream(
            dataset="tensor", batch_size=4, credits=1, mode=pb.MODE_SHARDED, job="x", rank=5, world_size=2
        )
        bad = pb.ClientMessage(open=opened)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([bad.SerializeToString()]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rank must be in" in info.value.details()


def _shared(server: Server, job: str, **kw: object) -> DataLoader:
    return DataLoader(server.address, "tensor", 8, True, seed=5, mode="shared", job=job, **kw)  # type: ignore[arg-type]


def _reference_epoch(tensor_ds, seed: int, epoch: int, batch_size: int) -> list[object]:
    order = torch.randperm(len(tensor_ds), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return list(TorchLoader(torch.utils.data.Subset(tensor_ds, order), batch_size))


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_shared_consumers_get_identical_batches_built_once(tensor_ds, transport: str) -> None:
    with Server({"tensor": tensor_ds}, port=0, num_workers=2) as srv:
        loaders = [_shared(srv, "sweep", transport=transport, rank=0) for _ in range(4)]
        for epoch in range(2):
            iters = [iter(loader) for loader in loaders]
            got: list[list[object]] = [[] for _ in loaders]
            # Round-robin so all four are inside the window together.
            for _ in range(len(loaders[0])):
                for k, it in enumerate(iters):
                    got[k].append(next(it))
            for it in iters:
                with pytest.raises(StopIteration):
                    next(it)
            expected = _reference_epoch(tensor_ds, 5, epoch, 8)
            for seq in got:
                assert_same(seq, expected)
        (job,) = srv.jobs.jobs()
        assert job.batches_built == 2 * len(expected)  # once per batch, not once per consumer
        assert srv.service.batches_built == 2 * len(expected)
        for loader in loaders:
            loader.close()


def test_shared_slow_consumer_applies_backpressure_and_leaving_releases_it(server: Server) -> None:
    fast, slow = _shared(server, "bp", prefetch_factor=1), _shared(server, "bp", prefetch_factor=1)
    slow_it, fast_it = iter(slow), iter(fast)
    next(slow_it)  # then the slow consumer stalls at 1 batch consumed
    window = 2  # 2 x prefetch_factor: the fast one may run this far past the slow one's position
    got = [next(fast_it) for _ in range(1 + window)]
    blocked = threading.Thread(target=lambda: got.append(next(fast_it)))
    blocked.start()
    blocked.join(timeout=1.0)
    assert blocked.is_alive(), "the fast consumer ran past the window"
    slow.close()  # the slow consumer leaves: the fast one is free to finish
    blocked.join(timeout=30)
    assert not blocked.is_alive()
    assert len(got) + len(list(fast_it)) == len(fast)
    fast.close()


def test_shared_late_joiner_starts_where_the_job_is(server: Server, tensor_ds) -> None:
    first, late = _shared(server, "late", prefetch_factor=2), _shared(server, "late", prefetch_factor=2)
    first_it = iter(first)
    head = [next(first_it) for _ in range(5)]
    late_it = iter(late)  # joins at the slowest consumer's position: batch 5
    tails: list[list[object]] = [[], []]
    live = {0, 1}
    while live:
        for k, it in ((0, first_it), (1, late_it)):
            if k in live:
                try:
                    tails[k].append(next(it))
                except StopIteration:
                    live.discard(k)
    expected = _reference_epoch(tensor_ds, 5, 0, 8)
    assert_same(head + tails[0], expected)
    assert_same(tails[1], expected[5:])
    assert late.state_dict()["epoch"] == 1
    first.close()
    late.close()


def _dynamic(address: str, job: str, **kw: object) -> DataLoader:
    return DataLoader(address, "tensor", 4, True, seed=2, mode="dynamic", job=job, **kw)  # type: ignore[arg-type]


def _ids(batches: list[object]) -> list[int]:
    return [int(v) for b in batches for v in b[0][:, 0].tolist()]  # type: ignore[index]


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_dynamic_splits_each_epoch_exactly_once(server: Server, tensor_ds, transport: str) -> None:
    # Trainers run concurrently: one that runs out waits for the others' batches in flight.
    loaders = [_dynamic(server.address, f"dyn-{transport}", transport=transport) for _ in range(3)]
    all_ids = sorted(int(x) for x in tensor_ds.tensors[0][:, 0].tolist())
    for _ in range(2):
        got = read_concurrently(loaders)
        assert sorted(_ids([b for seq in got for b in seq])) == all_ids
        assert sum(len(seq) for seq in got) == len(loaders[0])
    for loader in loaders:
        loader.close()


def test_dynamic_redelivers_what_a_dead_consumer_never_took(tensor_ds, tmp_path) -> None:
    import multiprocessing as mp

    record = tmp_path / "victim.txt"
    with Server({"tensor": tensor_ds}, port=0, num_workers=1) as srv:
        victim = mp.get_context("spawn").Process(target=_take_then_die, args=(srv.address, str(record)))
        victim.start()
        victim.join(timeout=60)
        assert victim.exitcode == 17
        # The victim took 3 batches into its loop (acknowledged) and held more in
        # flight (never acknowledged): those go to the survivor.
        with _dynamic(srv.address, "crash") as survivor:
            rest = _ids(list(survivor))
    taken = [int(x) for x in record.read_text().split()]
    assert len(taken) == 3 * 4
    assert sorted(taken + rest) == sorted(int(x) for x in tensor_ds.tensors[0][:, 0].tolist())


def _take_then_die(address: str, record: str) -> None:
    import os
    import time
    from pathlib import Path

    loader = _dynamic(address, "crash", prefetch_factor=4)
    it = iter(loader)
    taken = _ids([next(it) for _ in range(3)])
    Path(record).write_text(" ".join(map(str, taken)))
    time.sleep(0.5)  # let the acknowledgements reach the server, then die without closing
    os._exit(17)


def test_shared_resume_continues_with_the_next_batch(server: Server, tensor_ds) -> None:
    expected = _reference_epoch(tensor_ds, 5, 0, 8)
    with _shared(server, "resume-shared") as loader:
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        state = loader.state_dict()
    with _shared(server, "resume-shared") as loader:
        loader.load_state_dict(state)
        assert_same(head + list(loader), expected)


def test_jobs_are_listed_with_their_consumers(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    from batchferry import cli

    loader = DataLoader(
        server.address, "tensor", 8, True, seed=1, mode="sharded", job="listed", rank=1, world_size=2
    )
    it = iter(loader)
    next(it)
    assert cli.main(["jobs", server.address]) == 0
    jobs_table, consumers_table = capsys.readouterr().out.split("\n\n")
    assert jobs_table.splitlines()[0].split() == [
        "JOB", "MODE", "DATASET", "BATCH", "SIZE", "EPOCH", "WORLD", "CONSUMERS", "BATCHES", "BUILT"
    ]  # fmt: skip
    row = next(line for line in jobs_table.splitlines() if line.startswith("listed "))
    assert row.split()[1:7] == ["sharded", "tensor", "8", "0", "2", "1"]
    consumer = next(line for line in consumers_table.splitlines() if line.startswith("listed "))
    # The caller is on the server's host, so the peer is shown; rank 1 of 2 has 7 batches.
    assert consumer.split()[1:4] == ["ip:127.0.0.1", "1", "0"]
    assert re.search(r" \d/7 \(\d+%\) ", consumer)
    assert cli.main(["jobs", server.address, "--json"]) == 0
    (job,) = [j for j in json.loads(capsys.readouterr().out)["jobs"] if j["name"] == "listed"]
    assert set(job) == {
        "name", "mode", "dataset", "batch_size", "world_size", "batches_built", "epoch", "worlds", "consumers"
    }  # fmt: skip
    assert job["worlds"] == [{"world_size": 2, "epoch": 0}]
    assert (job["mode"], job["dataset"], job["batch_size"], job["world_size"]) == ("sharded", "tensor", 8, 2)
    (c,) = job["consumers"]
    assert set(c) == {"peer", "rank", "epoch", "batches_sent", "num_batches", "batches_taken"}
    assert (c["peer"], c["rank"], c["epoch"], c["num_batches"]) == ("ip:127.0.0.1", 1, 0, 7)
    assert 1 <= c["batches_sent"] <= 7
    loader.close()


def test_jobs_without_any_say_so(tensor_ds, capsys: pytest.CaptureFixture[str]) -> None:
    from batchferry import cli

    with Server({"tensor": tensor_ds}, port=0, num_workers=0) as srv:
        assert cli.main(["jobs", srv.address]) == 0
        assert capsys.readouterr().out == "no jobs\n"
        assert cli.main(["jobs", srv.address, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"jobs": []}


def test_dynamic_resume_rejoins_the_epoch_exactly_once(server: Server, tensor_ds) -> None:
    first = _dynamic(server.address, "resume-dyn")
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    first.close()  # a graceful close: its acknowledgements arrive; what it never took goes back
    with _dynamic(server.address, "resume-dyn") as second:
        second.load_state_dict(state)
        rest = list(second)
    ids = _ids(head + rest)
    assert sorted(ids) == sorted(int(x) for x in tensor_ds.tensors[0][:, 0].tolist())


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_shared_batches_that_outgrow_their_slot_are_rebuilt_for_everyone(transport: str) -> None:
    from toy_datasets import Growing

    ds = Growing()  # sample i holds (i + 1) x 256 KiB: every batch outgrows slots sized from sample 0
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist()
    expected = list(TorchLoader(torch.utils.data.Subset(ds, order), 1))
    with Server({"g": ds}, port=0, num_workers=1, slots=4) as srv:
        loaders = [
            DataLoader(srv.address, "g", 1, True, seed=1, mode="shared", job="grow", transport=transport,
                       timeout=30)
            for _ in range(2)
        ]  # fmt: skip
        for seq in in_step(loaders, len(expected)):
            assert_same(seq, expected)
        (job,) = srv.jobs.jobs()
        assert job.batches_built == len(expected)  # each built once (its overflow rebuilt once)
        for loader in loaders:
            loader.close()


@pytest.mark.parametrize("mode", ["shared", "dynamic"])
def test_a_long_running_job_keeps_a_bounded_number_of_epoch_states(server: Server, mode: str) -> None:
    with DataLoader(server.address, "tensor", 16, True, seed=1, mode=mode, job=f"long-{mode}") as loader:
        for _ in range(12):
            assert len(list(loader)) == 7
        job = next(j for j in server.jobs.jobs() if j.name == f"long-{mode}")
        assert len(job.epochs) <= 2
