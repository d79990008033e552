"""Jobs: sharded, shared and dynamic consumers of one server."""

from __future__ import annotations

import grpc
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.v1 import loader_pb2 as pb

from support import assert_same


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
