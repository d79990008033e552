"""Elastic jobs: a saved epoch continued by a world of another size, exactly once.

torch has no answer for a resize, so the promise is written with torch's own parts:
the old world's ranks take their first batches as torch's DataLoader over
DistributedSampler gives them; the samples of the epoch's order that no rank took,
in order, are split among the new world's ranks by DistributedSampler (its padding
and drop_last), and batched by torch's DataLoader.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler, Subset

from batchferry import errors, shm
from batchferry.client import DataLoader, merge_states
from batchferry.server import Server, metrics, parse_spec
from batchferry.server.jobs import MAX_RESIZES, JobRegistry, JobSettings
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from processes import ServeProcess
from reading import read_concurrently

SEED, EPOCH = 7, 1


def _ours(
    server: Server, job: str, rank: int, world: int, bs: int, shuffle: bool, drop_last: bool
) -> DataLoader:
    return DataLoader(
        server.address, "tensor", bs, shuffle, seed=SEED, drop_last=drop_last, mode="sharded",
        job=job, rank=rank, world_size=world,
    )  # fmt: skip


def _order(n: int, shuffle: bool, draw: int = SEED + EPOCH) -> list[int]:
    """The epoch's order, as DistributedSampler draws it (from seed + epoch)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed(draw)
    return torch.randperm(n, generator=g).tolist()


def _torch_rank(ds: Any, world: int, rank: int, bs: int, shuffle: bool, drop_last: bool) -> list[Any]:
    sampler = DistributedSampler(ds, world, rank, shuffle=shuffle, seed=SEED, drop_last=drop_last)
    sampler.set_epoch(EPOCH)
    return list(TorchLoader(ds, bs, sampler=sampler, drop_last=drop_last))


def _ids(batch: Sequence[torch.Tensor]) -> list[int]:
    return (batch[0][:, 0] // 4).long().tolist()


def _expected_rest(
    ds: Any, taken: set[int], world: int, bs: int, shuffle: bool, drop_last: bool, draw: int = SEED + EPOCH
) -> list[list[Any]]:
    """The new world's batches, by torch: DistributedSampler over what no old rank took, in order."""
    rest = Subset(ds, [i for i in _order(len(ds), shuffle, draw) if i not in taken])
    samplers = [DistributedSampler(rest, world, r, shuffle=False, drop_last=drop_last) for r in range(world)]
    return [list(TorchLoader(rest, bs, sampler=sampler, drop_last=drop_last)) for sampler in samplers]


@pytest.mark.parametrize(
    ("old", "new", "taken", "bs", "shuffle", "drop_last"),
    [
        (4, 2, 6, 3, True, False),
        (2, 3, 5, 4, True, True),
        (4, 6, 3, 2, False, False),
        (3, 5, 4, 3, True, True),
    ],
)
def test_sharded_resize_mid_epoch(
    server: Server, tensor_ds, old: int, new: int, taken: int, bs: int, shuffle: bool, drop_last: bool
) -> None:
    job = f"resize-{old}-{new}-{shuffle}-{drop_last}"
    seen: list[int] = []
    states = []
    for r in range(old):
        with _ours(server, job, r, old, bs, shuffle, drop_last) as loader:
            loader.set_epoch(EPOCH)
            it = iter(loader)
            head = [next(it) for _ in range(taken)]
            assert_same(head, _torch_rank(tensor_ds, old, r, bs, shuffle, drop_last)[:taken])
            seen += [i for b in head for i in _ids(b)]
            states.append(loader.state_dict())
    assert states[0]["world_size"] == old and states[0]["in_epoch"]
    expected = _expected_rest(tensor_ds, set(seen), new, bs, shuffle, drop_last)
    for r in range(new):
        with _ours(server, job, r, new, bs, shuffle, drop_last) as loader:
            loader.load_state_dict(states[0])  # one rank's state stands for every rank
            assert len(loader) == len(expected[r])
            rest = list(loader)
            assert_same(rest, expected[r])
            seen += [i for b in rest for i in _ids(b)]
            # The next epoch is DistributedSampler's for the new world.
            sampler = DistributedSampler(tensor_ds, new, r, shuffle=shuffle, seed=SEED, drop_last=drop_last)
            sampler.set_epoch(EPOCH + 1)
            assert_same(list(loader), list(TorchLoader(tensor_ds, bs, sampler=sampler, drop_last=drop_last)))
    n = len(tensor_ds)
    if drop_last:  # each sample at most once; those left out are fewer than one per rank and batch
        assert len(seen) == len(set(seen)) and n - len(seen) < old * bs + new * bs
    else:  # each sample at least once; repeats are padding, fewer than one per rank
        assert set(seen) == set(range(n)) and len(seen) - n < old + new


def test_a_job_counts_every_resize_beyond_the_sizes_it_lists() -> None:
    settings = JobSettings(
        mode=pb.MODE_SHARDED, dataset="tensor", batch_size=4, shuffle=True, drop_last=False,
        collate="default", seed=SEED, world_size=1,
    )  # fmt: skip
    registry = JobRegistry()
    for k in range(MAX_RESIZES + 4):  # 1, 2, 1, 2, ...: a resize each time but the first
        job, consumer = registry.join("job", replace(settings, world_size=1 + k % 2), "peer", 0, k)
        registry.leave(job, consumer)
    counted = {f.name: f for f in metrics._job_families(registry)}["batchferry_job_resizes"]
    assert [s.value for s in counted.samples if s.name.endswith("_total")] == [MAX_RESIZES + 3]
    assert len(job.worlds) == MAX_RESIZES


def test_resized_jobs_that_differ_in_shuffle_alone_keep_their_own_orders(server: Server, tensor_ds) -> None:
    """The server keeps the rest of a resized epoch's order for its ranks, found by what
    decides it: a job in order, and a shuffled one drawing from seed + epoch = 0, with the
    same positions taken, each continue in their own order."""
    for shuffle in (True, False):
        job, seen, states = f"rest-{shuffle}", set(), []
        for r in range(2):
            kw: Any = {"seed": 0, "mode": "sharded", "job": job, "rank": r, "world_size": 2}
            with DataLoader(server.address, "tensor", 4, shuffle, **kw) as loader:
                it = iter(loader)
                seen |= {i for _ in range(2) for i in _ids(next(it))}
                states.append(loader.state_dict())
        kw = {"seed": 0, "mode": "sharded", "job": job, "rank": 0, "world_size": 1}
        with DataLoader(server.address, "tensor", 4, shuffle, **kw) as loader:
            loader.load_state_dict(states[0])
            assert_same(list(loader), _expected_rest(tensor_ds, seen, 1, 4, shuffle, False, draw=0)[0])


def test_jobs_list_the_world_sizes_a_job_ran_in(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    from batchferry import cli

    job = "listed-resize"
    for world in (4, 2):
        with _ours(server, job, 0, world, 4, True, False) as loader:
            loader.set_epoch(EPOCH)
            next(iter(loader))
    assert cli.main(["jobs", server.address]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(job))
    assert f"4 -> 2 (epoch {EPOCH})" in row
    assert cli.main(["jobs", server.address, "--json"]) == 0
    (listed,) = [j for j in json.loads(capsys.readouterr().out)["jobs"] if j["name"] == job]
    assert listed["worlds"] == [{"world_size": 4, "epoch": EPOCH}, {"world_size": 2, "epoch": EPOCH}]
    assert (listed["world_size"], listed["epoch"]) == (2, EPOCH)


def test_resize_twice_within_an_epoch(server: Server, tensor_ds) -> None:
    """4 -> 2 -> 3 in one epoch: the second resize splits what the first world's and the
    second world's ranks left."""
    bs, job = 3, "resize-twice"
    seen: list[int] = []
    state: dict[str, Any] = {}
    for world, taken in ((4, 4), (2, 5)):
        for r in range(world):
            with _ours(server, job, r, world, bs, True, False) as loader:
                if state:
                    loader.load_state_dict(state)
                else:
                    loader.set_epoch(EPOCH)
                it = iter(loader)
                seen += [i for _ in range(taken) for i in _ids(next(it))]
                saved = loader.state_dict()
        state = saved
    expected = _expected_rest(tensor_ds, set(seen), 3, bs, True, False)
    for r in range(3):
        with _ours(server, job, r, 3, bs, True, False) as loader:
            loader.load_state_dict(state)
            rest = list(loader)
            assert_same(rest, expected[r])
            seen += [i for b in rest for i in _ids(b)]
    assert set(seen) == set(range(len(tensor_ds)))
    assert len(seen) - len(tensor_ds) < 3


def test_ranks_saved_at_different_steps_merge(server: Server, tensor_ds) -> None:
    """Ranks that took different numbers of batches: the merged state (or the list of
    states) gives the new world exactly what no rank took."""
    bs, job, counts = 4, "merge-steps", [5, 3, 4]
    seen: list[int] = []
    states = []
    for r, taken in enumerate(counts):
        with _ours(server, job, r, 3, bs, True, False) as loader:
            loader.set_epoch(EPOCH)
            it = iter(loader)
            seen += [i for _ in range(taken) for i in _ids(next(it))]
            states.append(loader.state_dict())
    expected = _expected_rest(tensor_ds, set(seen), 2, bs, True, False)
    merged = merge_states(states)
    for r in range(2):
        for given in (merged, list(reversed(states))):
            with _ours(server, job, r, 2, bs, True, False) as loader:
                loader.load_state_dict(given)
                assert_same(list(loader), expected[r])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"mode": "independent", "job": None, "rank": 0, "world_size": 1}, "mode"),
        ({"job": "another"}, "job 'another'"),
        ({"dataset": "plain"}, "dataset"),
        ({"seed": 2}, "seed=1"),  # the job's order: a forgotten job's server cannot tell
    ],
)
def test_states_that_cannot_be_mapped_are_refused(
    server: Server, change: dict[str, Any], needle: str
) -> None:
    kw: dict[str, Any] = {"mode": "sharded", "job": "refused", "rank": 0, "world_size": 2, "seed": 1}
    with DataLoader(server.address, "tensor", 4, True, **kw) as loader:
        next(iter(loader))
        state = loader.state_dict()
    other_kw = {**kw, **change}
    with DataLoader(server.address, other_kw.pop("dataset", "tensor"), 4, True, **other_kw) as other:
        with pytest.raises(errors.InvalidArgument, match=needle):
            other.load_state_dict(state)


def test_a_state_of_another_dataset_length_is_refused(server: Server) -> None:
    with DataLoader(server.address, "plain", 4, True, seed=1) as loader:
        next(iter(loader))
        state = loader.state_dict()
    state["length"] += 1
    with DataLoader(server.address, "plain", 4, True, seed=1) as loader:
        loader.load_state_dict(state)  # not asking the servers: checked at iter()
        with pytest.raises(errors.InvalidArgument, match="samples"):
            iter(loader)
        with pytest.raises(errors.InvalidArgument, match="samples"):
            iter(loader)  # still refused: nothing moved
    with DataLoader(server.address, "plain", 4, True, seed=1) as loader:
        len(loader)  # the servers have been asked: refused at once
        with pytest.raises(errors.InvalidArgument, match="samples"):
            loader.load_state_dict(state)


def test_own_sampler_into_another_world_size_is_refused(server: Server, tensor_ds) -> None:
    def make(world: int) -> DataLoader:
        sampler = DistributedSampler(tensor_ds, world, 0, shuffle=True, seed=1)
        return DataLoader(server.address, "tensor", 4, sampler=sampler)

    with make(2) as loader:
        next(iter(loader))
        state = loader.state_dict()
    with make(3) as loader, pytest.raises(errors.InvalidArgument, match="own sampler"):
        loader.load_state_dict(state)


def test_out_of_order_rank_state_into_another_world_is_refused(server: Server) -> None:
    kw: dict[str, Any] = {"mode": "sharded", "job": "any-order", "seed": 1, "in_order": False}
    with DataLoader(server.address, "tensor", 4, True, rank=1, world_size=2, **kw) as loader:
        it = iter(loader)
        next(it), next(it)
        state = loader.state_dict()
    with DataLoader(server.address, "tensor", 4, True, rank=0, world_size=3, **kw) as other:
        with pytest.raises(errors.InvalidArgument, match="merge_states"):
            other.load_state_dict(state)
    with DataLoader(server.address, "tensor", 4, True, rank=0, world_size=2, **kw) as other:
        with pytest.raises(errors.InvalidArgument, match="rank 1"):
            other.load_state_dict(state)


def test_merge_states_refuses_what_it_cannot_merge(server: Server) -> None:
    with pytest.raises(errors.InvalidArgument, match="no states"):
        merge_states([])
    kw: dict[str, Any] = {"mode": "sharded", "job": "incomplete", "seed": 1, "world_size": 3}
    states = []
    for r in (0, 2):
        with DataLoader(server.address, "tensor", 4, True, rank=r, **kw) as loader:
            next(iter(loader))
            states.append(loader.state_dict())
    with pytest.raises(errors.InvalidArgument, match=r"missing rank\(s\) \[1\]"):
        merge_states(states)
    states[1]["epoch"] += 1
    with pytest.raises(errors.InvalidArgument, match="disagree on epoch"):
        merge_states(states)


REPLICA_SPEC = "synthetic:n=300,shape=6,seed=4"  # 19 batches of 16


def _replicas(stack: ExitStack, count: int) -> list[str]:
    """``count`` servers, replicas of one another: their addresses."""
    return [
        stack.enter_context(
            Server({"syn": REPLICA_SPEC}, port=0, num_workers=1, replica_index=i, num_replicas=count)
        ).address
        for i in range(count)
    ]


@pytest.mark.parametrize("in_order", [True, False])
def test_a_state_of_two_replicas_continues_on_three(in_order: bool) -> None:
    """The StatefulSet scaled from 2 to 3 between runs: the epoch goes on exactly."""
    ds = parse_spec(REPLICA_SPEC)
    expected = list(TorchLoader(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(3)))
    with ExitStack() as stack:
        loader = stack.enter_context(
            DataLoader(_replicas(stack, 2), "syn", 16, True, seed=3, in_order=in_order)
        )
        it = iter(loader)
        head = [next(it) for _ in range(7)]
        state = loader.state_dict()
    assert state["replicas"] == 2
    with ExitStack() as stack:
        loader = stack.enter_context(
            DataLoader(_replicas(stack, 3), "syn", 16, True, seed=3, in_order=in_order)
        )
        loader.load_state_dict(state)
        tail = list(loader)
    got = head + tail
    if not in_order:  # the same batches, each once, in the order they came
        got, expected = sorted(got, key=_first), sorted(expected, key=_first)
    assert_same(got, expected)


def _first(batch: Sequence[torch.Tensor]) -> float:
    return float(batch[0].flatten()[0])


@pytest.mark.parametrize("server_too", [True, False])
def test_a_dynamic_job_restarted_whole_continues_with_fewer_consumers(
    tmp_path: Path, server_too: bool
) -> None:
    """Server and every trainer killed; the job restarts from the trainers' saved states
    with 2 consumers where there were 3: what they took up to the checkpoint, and what
    the new consumers take, is the epoch exactly once (what was taken after the
    checkpoint is taken again: the model that saw it is gone)."""
    n, bs = 120, 4
    np.save(tmp_path / "x.npy", np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1))
    server = ServeProcess(f"ids=npy:{tmp_path / 'x.npy'}")
    kw: dict[str, Any] = {
        "shuffle": True,
        "seed": 9,
        "mode": "dynamic",
        "job": "whole-restart",
        "timeout": 30,
    }
    server.start()
    try:
        first = [DataLoader(server.address, "ids", bs, **kw) for _ in range(3)]
        its = [iter(loader) for loader in first]
        trained = [[next(it) for _ in range(4)] for it in its]  # up to the checkpoint
        states = [loader.state_dict() for loader in first]
        for it in its:
            next(it), next(it)  # after it: lost with the trainers
        del its
        if server_too:
            server.kill()
        for loader in first:
            loader.close()
        if server_too:
            server.start()
        second = [DataLoader(server.address, "ids", bs, **kw) for _ in range(2)]
        for loader in second:
            loader.load_state_dict(merge_states(states))
        rest = read_concurrently(second)
        for loader in second:
            loader.close()
    finally:
        server.stop()
        shm.remove_stale()
    ids = [int(i) for batches in trained + rest for b in batches for i in b[:, 0]]
    assert sorted(ids) == list(range(n))


def test_a_new_size_is_refused_while_the_old_ranks_still_read(server: Server) -> None:
    with _ours(server, "two-sizes", 0, 4, 4, True, False) as old:
        next(iter(old))
        with _ours(server, "two-sizes", 0, 2, 4, True, False) as new:
            with pytest.raises(errors.InvalidArgument, match="resizes once every consumer of the old size"):
                next(iter(new))
        old.close()
        with _ours(server, "two-sizes", 0, 2, 4, True, False) as new:
            assert next(iter(new)) is not None  # the old rank has left: the job takes the new size
