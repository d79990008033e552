"""``batch_size=None``: samples one by one, converted as torch converts them, in torch's order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler, SubsetRandomSampler

from batchferry import errors
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.server.modes import sampled
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from toy_datasets import Arrays, Ints, Nested, Plain, Point, Points, double_first

TRANSPORTS = ["grpc", "shm"]
DATASETS = {"plain": Plain(50), "arrays": Arrays(), "nested": Nested(), "ints": Ints(), "points": Points()}


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with Server(DATASETS, port=0, num_workers=2, collates={"double_first": double_first}) as server:
        yield server


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_shuffled_with_a_generator_as_torch(srv: Server, transport: str) -> None:
    ours_gen, torch_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    theirs = TorchLoader(DATASETS["plain"], batch_size=None, shuffle=True, generator=torch_gen)
    with DataLoader(
        srv.address, "plain", batch_size=None, shuffle=True, generator=ours_gen, transport=transport
    ) as loader:
        assert len(loader) == len(theirs) == 50
        for _ in range(2):  # the second epoch continues from the generator as torch's does
            ours = list(loader)
            assert_same(ours, list(theirs))
            assert torch.equal(ours_gen.get_state(), torch_gen.get_state())
    assert isinstance(ours[0][1], int) and ours[0][0].shape == (3,)  # no batch dimension


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_with_a_sampler_as_torch(srv: Server, transport: str) -> None:
    indices = [3, 41, 7, 0, 19, 22, 8]
    theirs = TorchLoader(
        DATASETS["plain"],
        batch_size=None,
        sampler=SubsetRandomSampler(indices, generator=torch.Generator().manual_seed(1)),
    )
    sampler = SubsetRandomSampler(indices, generator=torch.Generator().manual_seed(1))
    with DataLoader(srv.address, "plain", batch_size=None, sampler=sampler, transport=transport) as loader:
        assert len(loader) == len(theirs) == 7
        assert_same(list(loader), list(theirs))


@pytest.mark.parametrize("dataset", ["arrays", "nested", "ints", "points"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_samples_are_converted_as_torch_converts_them(srv: Server, dataset: str, transport: str) -> None:
    theirs = list(TorchLoader(DATASETS[dataset], batch_size=None))
    with DataLoader(srv.address, dataset, batch_size=None, transport=transport) as loader:
        assert len(loader) == len(DATASETS[dataset])
        ours = list(loader)
    assert_same(ours, theirs)
    if dataset == "arrays":
        first = ours[1]
        assert first["image"].dtype == torch.uint8 and first["image"].shape == (2, 3)
        assert first["np_scalar"].dtype == torch.int16 and first["np_scalar"].shape == ()
        assert type(first["label"]) is int and type(first["score"]) is float and first["name"] == "s1"
        assert isinstance(first["pair"], list)  # a tuple converts to a list, as in torch
    if dataset == "ints":
        assert ours == [i * 3 for i in range(17)] and all(type(v) is int for v in ours)
    if dataset == "points":
        assert all(type(p) is Point for p in ours) and ours[2].y == 2


def test_a_named_collate_gets_each_sample_by_itself(srv: Server) -> None:
    theirs = list(TorchLoader(DATASETS["plain"], batch_size=None, collate_fn=double_first))
    with DataLoader(srv.address, "plain", batch_size=None, collate_fn="double_first") as loader:
        assert_same(list(loader), theirs)


def test_resume_continues_with_the_next_sample(srv: Server) -> None:
    theirs = list(TorchLoader(DATASETS["plain"], batch_size=None, shuffle=True, generator=_gen(3)))
    with DataLoader(srv.address, "plain", batch_size=None, shuffle=True, generator=_gen(3)) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(11)]
        state = loader.state_dict()
    with DataLoader(srv.address, "plain", batch_size=None, shuffle=True, generator=_gen(0)) as again:
        again.load_state_dict(state)
        assert_same(head + list(again), theirs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": None, "drop_last": True},
        {"batch_size": None, "batch_sampler": [[0, 1]]},
        {"batch_size": None, "sampler": [0, 1], "shuffle": True},
    ],
)
def test_refused_as_torch_refuses(srv: Server, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as theirs:
        TorchLoader(DATASETS["plain"], **kwargs)
    with pytest.raises(errors.InvalidArgument) as ours:
        DataLoader(srv.address, "plain", **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_the_server_takes_one_sample_at_a_time_without_batching(srv: Server) -> None:
    from batchferry.server.plan import Catalog, plan
    from batchferry.server.status import Abort

    catalog = Catalog(lengths={"plain": 50}, collates=frozenset({"default", "convert"}), chunk_bytes=1 << 20)
    request = pb.OpenStream(dataset="plain", batch_size=2, collate="convert", credits=2, unbatched=True)
    with pytest.raises(Abort, match="batch_size must be 1 when unbatched"):
        plan(request, catalog)
    request.batch_size = 1
    planned = plan(request, catalog)
    assert planned.unbatched and planned.num_batches == 50
    two = pb.BatchIndices(index=[0], lengths=[2], samples=[4, 5])
    with pytest.raises(Abort, match="every batch needs 1 to 1 samples"):
        sampled.unpack(two, replace(planned, client_batches=True), -1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sharded_ranks_get_distributed_samplers_samples(srv: Server, transport: str) -> None:
    for rank in range(2):
        sampler = DistributedSampler(DATASETS["plain"], 2, rank, shuffle=True, seed=5)
        theirs = list(TorchLoader(DATASETS["plain"], batch_size=None, sampler=sampler))
        job = f"unbatched-{transport}"
        with DataLoader(
            srv.address, "plain", batch_size=None, shuffle=True, seed=5, mode="sharded", job=job,
            rank=rank, world_size=2, transport=transport,
        ) as loader:  # fmt: skip
            assert len(loader) == len(theirs) == 25
            assert_same(list(loader), theirs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
