"""Several streams per server, each on its own connection, split its part of the epoch."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler, WeightedRandomSampler

from batchferry import errors
from batchferry.client import DataLoader
from batchferry.server import Server

from checks import assert_same


@pytest.mark.parametrize("streams", [2, 3])
def test_stripes_give_torch_order_and_resume(server: Server, tensor_ds, streams: int) -> None:
    ref = TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(5))
    expected = [list(ref) for _ in range(2)]
    loader = DataLoader(server.address, "tensor", 8, True, seed=5, transport="grpc", streams=streams)
    assert loader.stripes == streams
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = loader.state_dict()
    loader.close()
    with DataLoader(server.address, "tensor", 8, True, seed=1, transport="grpc", streams=streams) as again:
        again.load_state_dict(state)
        got = [head + list(again), list(again)]
    for epoch in range(2):
        assert_same(got[epoch], expected[epoch])


def test_stripes_with_replicas_samplers_and_shards(tensor_ds) -> None:
    with (
        Server({"t": tensor_ds}, port=0, num_workers=0, replica_index=0, num_replicas=2) as a,
        Server({"t": tensor_ds}, port=0, num_workers=0, replica_index=1, num_replicas=2) as b,
    ):
        addresses = [a.address, b.address]
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        weights = torch.linspace(0.1, 1, len(tensor_ds))
        ref = TorchLoader(tensor_ds, 6, sampler=WeightedRandomSampler(weights, 70, generator=g1))
        with DataLoader(addresses, "t", 6, sampler=WeightedRandomSampler(weights, 70, generator=g2),
                        transport="grpc", streams=3) as loader:  # fmt: skip
            assert_same(list(loader), list(ref))
        sampler = DistributedSampler(tensor_ds, 2, 1, shuffle=True, seed=9)
        expected = list(TorchLoader(tensor_ds, 5, sampler=sampler))
        kw: dict[str, Any] = {"mode": "sharded", "job": "s", "rank": 1, "world_size": 2, "seed": 9}
        with DataLoader(addresses, "t", 5, True, streams=2, in_order=False, **kw) as loader:
            got = list(loader)
        assert sorted(tuple(x[0][:, 0].tolist()) for x in got) == sorted(
            tuple(x[0][:, 0].tolist()) for x in expected
        )


def test_stripes_are_refused_where_a_job_shares_one_order(server: Server) -> None:
    with pytest.raises(errors.InvalidArgument, match="streams"):
        DataLoader(server.address, "tensor", 4, mode="shared", job="j", streams=2)
    with pytest.raises(errors.InvalidArgument, match="streams"):
        DataLoader(server.address, "tensor", 4, streams=17)
