"""A drop-in for torch's DataLoader: every argument, the caller's own samplers, in_order, batch_transform."""

from __future__ import annotations

import inspect
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data import DataLoader as TorchLoader

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same

N = 103


class LengthBuckets(Sampler[list[int]]):
    """Length bucketing as NLP trainers do it: shuffle, sort within chunks by length, batch."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator) -> None:
        self.lengths, self.batch_size, self.generator = lengths, batch_size, generator

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        chunk = self.batch_size * 4
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.lengths[i])
            batches += [part[k : k + self.batch_size] for k in range(0, len(part), self.batch_size)]
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]

    def __len__(self) -> int:
        chunk = self.batch_size * 4
        return sum(
            -(-min(chunk, len(self.lengths) - s) // self.batch_size)
            for s in range(0, len(self.lengths), chunk)
        )


def _samplers(kind: str, ds: Any) -> tuple[dict[str, Any], torch.Generator]:
    """Fresh sampler arguments for one loader, and the generator that drives them."""
    g = torch.Generator().manual_seed(7)
    if kind == "random":
        return {"sampler": RandomSampler(ds, generator=g)}, g
    if kind == "weighted":
        return {"sampler": WeightedRandomSampler(torch.linspace(0.1, 1, N), 60, generator=g)}, g
    if kind == "subset":
        return {"sampler": SubsetRandomSampler(list(range(0, N, 3)), generator=g)}, g
    if kind == "buckets":
        return {"batch_sampler": LengthBuckets([i % 17 for i in range(N)], 8, g), "batch_size": 1}, g
    raise ValueError(kind)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
@pytest.mark.parametrize("kind", ["random", "weighted", "subset", "buckets"])
def test_samplers_give_torch_batches_and_rng_epoch_after_epoch(
    server: Server, tensor_ds, kind: str, transport: str
) -> None:
    theirs, g_theirs = _samplers(kind, tensor_ds)
    ours, g_ours = _samplers(kind, tensor_ds)
    ref = TorchLoader(tensor_ds, **{"batch_size": 8, **theirs})
    with DataLoader(server.address, "tensor", **{"batch_size": 8, **ours}, transport=transport) as loader:
        assert len(loader) == len(ref)
        for _ in range(3):
            assert_same(list(loader), list(ref))
            assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def test_a_distributed_sampler_object_is_run_as_torch_runs_it(server: Server, tensor_ds) -> None:
    ref_sampler = DistributedSampler(tensor_ds, 3, 1, shuffle=True, seed=5)
    our_sampler = DistributedSampler(tensor_ds, 3, 1, shuffle=True, seed=5)
    ref = TorchLoader(tensor_ds, 4, sampler=ref_sampler)
    with DataLoader(server.address, "tensor", 4, sampler=our_sampler) as loader:
        for epoch in range(3):
            ref_sampler.set_epoch(epoch)
            our_sampler.set_epoch(epoch)
            assert_same(list(loader), list(ref))


@pytest.mark.parametrize("kind", ["random", "buckets"])
@pytest.mark.parametrize("stop_at", [0, 3, 7])
def test_a_sampler_loader_resumes_mid_epoch_exactly(
    server: Server, tensor_ds, kind: str, stop_at: int
) -> None:
    theirs, _ = _samplers(kind, tensor_ds)
    ref = TorchLoader(tensor_ds, **{"batch_size": 8, **theirs})
    expected = [list(ref) for _ in range(2)]
    ours, _ = _samplers(kind, tensor_ds)
    first = DataLoader(server.address, "tensor", **{"batch_size": 8, **ours})
    it = iter(first)
    head = [next(it) for _ in range(stop_at)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # plain data
    first.close()
    again, _ = _samplers(kind, tensor_ds)  # a new process: fresh sampler objects
    torch.manual_seed(12345)  # whatever the global RNG holds meanwhile
    with DataLoader(server.address, "tensor", **{"batch_size": 8, **again}) as second:
        second.load_state_dict(state)
        got = [head + list(second), list(second)]
    for epoch in range(2):
        assert_same(got[epoch], expected[epoch])


def test_samplers_work_across_replicas(tensor_ds) -> None:
    with (
        Server({"t": tensor_ds}, port=0, num_workers=0, replica_index=0, num_replicas=2) as a,
        Server({"t": tensor_ds}, port=0, num_workers=0, replica_index=1, num_replicas=2) as b,
    ):
        theirs, g_theirs = _samplers("weighted", tensor_ds)
        ours, g_ours = _samplers("weighted", tensor_ds)
        ref = TorchLoader(tensor_ds, 8, **theirs)
        with DataLoader([b.address, a.address], "t", 8, **ours) as loader:
            assert loader.num_replicas == 2
            for _ in range(2):
                assert_same(list(loader), list(ref))
            assert torch.equal(g_ours.get_state(), g_theirs.get_state())


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_in_order_false_delivers_every_batch_once_and_resumes(
    server: Server, tensor_ds, transport: str
) -> None:
    expected = list(TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(3)))

    def key(batch: Any) -> tuple[float, ...]:
        return tuple(batch[0][:, 0].tolist())

    with DataLoader(server.address, "tensor", 8, True, seed=3, in_order=False, transport=transport) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        state = loader.state_dict()
    with DataLoader(
        server.address, "tensor", 8, True, seed=99, in_order=False, transport=transport
    ) as loader:
        loader.load_state_dict(state)
        rest = list(loader)
    got = sorted(map(key, head + rest))
    assert got == sorted(map(key, expected))  # every batch once, none repeated


def test_a_state_saved_in_order_resumes_out_of_order_and_not_the_other_way(server: Server, tensor_ds) -> None:
    expected = list(TorchLoader(tensor_ds, 8, shuffle=True, generator=torch.Generator().manual_seed(3)))

    def key(batch: Any) -> tuple[float, ...]:
        return tuple(batch[0][:, 0].tolist())

    with DataLoader(server.address, "tensor", 8, True, seed=3) as loader:
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        in_order = loader.state_dict()
    with DataLoader(server.address, "tensor", 8, True, in_order=False) as loader:
        loader.load_state_dict(in_order)  # the first 5 were taken
        rest = list(loader)
    assert sorted(map(key, head + rest)) == sorted(map(key, expected))

    # Taken out of order: an in-order loader cannot skip what was taken, so it refuses.
    taken = [0, 2, 3]
    state = {**in_order, "batch": len(taken), "done": bytes([sum(1 << i for i in taken)])}
    with DataLoader(server.address, "tensor", 8, True) as loader:
        with pytest.raises(errors.InvalidArgument, match=r"out of order.*in_order=False"):
            loader.load_state_dict(state)
    # ... unless what was taken is the epoch's start.
    state = {**in_order, "batch": 3, "done": bytes([0b111])}
    with DataLoader(server.address, "tensor", 8, True) as loader:
        loader.load_state_dict(state)
        assert_same(list(loader), expected[3:])


def test_every_torch_argument_is_accepted_in_torch_order(server: Server) -> None:
    theirs = inspect.signature(TorchLoader).parameters
    ours = inspect.signature(DataLoader).parameters
    for name, param in theirs.items():
        if name == "dataset":
            continue
        assert name in ours, f"torch's {name} is missing"
        assert ours[name].kind == param.kind, f"{name}: {ours[name].kind} vs torch's {param.kind}"
    positional = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD][1:]
    assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD][2:] == positional
    g = torch.Generator().manual_seed(0)
    every = {
        "batch_size": 8, "shuffle": True, "sampler": None, "batch_sampler": None, "num_workers": 2,
        "collate_fn": None, "pin_memory": False, "drop_last": True, "timeout": 0,
        "worker_init_fn": None, "multiprocessing_context": None, "generator": g, "prefetch_factor": 2,
        "persistent_workers": True, "pin_memory_device": "", "in_order": True,
    }  # fmt: skip
    assert set(every) == set(theirs) - {"dataset"}
    with DataLoader(server.address, "tensor", **every) as loader:  # num_workers=2: as the server has
        assert len(list(loader)) == N // 8


def test_the_tutorial_line_runs_with_one_warning_naming_the_server_setting(server: Server, tensor_ds) -> None:
    def worker_init(_: int) -> None: ...

    with pytest.warns(errors.ServerSideWarning) as caught:
        loader = DataLoader(
            server.address, "tensor", batch_size=64, shuffle=True, num_workers=4, persistent_workers=True,
            pin_memory=True, worker_init_fn=worker_init,
        )  # fmt: skip
        for _ in range(2):
            assert len(list(loader)) == 2
        loader.close()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "num_workers=4" in message and "--num-workers" in message and "worker_init_fn" in message


@pytest.mark.parametrize("how", ["iter", "len", "for", "transport", "num_replicas"])
def test_the_server_side_warning_names_the_callers_line(server: Server, how: str) -> None:
    """Whichever call first asks the server, the warning points at it, as torch's own do."""
    loader = DataLoader(server.address, "tensor", batch_size=64, num_workers=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "iter":
            iter(loader)
        elif how == "len":
            len(loader)
        elif how == "for":
            for _ in loader:
                break
        else:
            getattr(loader, how)
    loader.close()
    assert [w.category for w in caught] == [errors.ServerSideWarning]
    assert caught[0].filename == __file__, (caught[0].filename, caught[0].lineno)


@pytest.mark.parametrize("workers", [None, 0, 2])  # 2: as many as the server has
def test_num_workers_that_change_nothing_are_not_warned_about(server: Server, workers: int | None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DataLoader(server.address, "tensor", batch_size=64, num_workers=workers) as loader:
            assert len(list(loader)) == 2
    assert not caught, [str(w.message) for w in caught]


def test_persistent_workers_keep_torch_order(server: Server, tensor_ds) -> None:
    """torch draws no new base seed when it reuses persistent workers' iterator: neither do we."""
    ref = TorchLoader(tensor_ds, 8, shuffle=True, num_workers=1, persistent_workers=True,
                      generator=torch.Generator().manual_seed(4))  # fmt: skip
    expected = [list(ref) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", errors.ServerSideWarning)
        with DataLoader(server.address, "tensor", 8, True, num_workers=1, persistent_workers=True,
                        generator=torch.Generator().manual_seed(4)) as loader:  # fmt: skip
            got = [list(loader) for _ in range(3)]
    for e in range(3):
        assert_same(got[e], expected[e])


def test_batch_transform_runs_in_the_trainer_on_every_batch(server: Server, tensor_ds) -> None:
    with DataLoader(server.address, "tensor", 10, batch_transform=lambda b: (b[0] * 2, b[1])) as loader:
        got = list(loader)
    ref = list(TorchLoader(tensor_ds, 10))
    assert all(torch.equal(g[0], r[0] * 2) for g, r in zip(got, ref, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"collate_fn": lambda b: b}, "register_collate.*batch_transform"),
        ({"batch_size": None, "drop_last": True}, "batch_size=None.*mutually exclusive with drop_last"),
        ({"sampler": [1, 2], "shuffle": True}, "mutually exclusive with shuffle"),
        ({"batch_sampler": [[1]], "batch_size": 4}, "mutually exclusive"),
        ({"batch_sampler": [[1]], "drop_last": True}, "mutually exclusive"),
        ({"sampler": [1], "mode": "shared", "job": "j"}, "not in shared mode"),
        ({"batch_transform": 3}, "batch_transform must be callable"),
        ({"in_order": "no"}, "in_order must be a bool"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_argument(
    server: Server, kwargs: dict[str, Any], needle: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=needle):
        DataLoader(server.address, "tensor", **kwargs)


def _client_stream(address: str, lists: list[pb.BatchIndices], **open_fields: Any) -> grpc.RpcError | None:
    opened = pb.OpenStream(dataset="tensor", batch_size=1, credits=2, client_batches=True, **open_fields)
    messages = [pb.ClientMessage(open=opened).SerializeToString()]
    messages += [pb.ClientMessage(batches=b).SerializeToString() for b in lists]
    with grpc.insecure_channel(address) as channel:
        try:
            list(channel.stream_stream(wire.STREAM_BATCHES)(iter(messages), timeout=20))
        except grpc.RpcError as exc:
            return exc
    return None


@pytest.mark.parametrize(
    ("lists", "needle"),
    [
        ([pb.BatchIndices(index=[0], lengths=[2], samples=[0, N])], f"sample index {N} is outside"),
        ([pb.BatchIndices(index=[0], lengths=[2], samples=[0])], "lengths add up to 2, but 1 samples"),
        ([pb.BatchIndices(index=[0, 1], lengths=[1], samples=[0])], "2 batch indices but 1 lengths"),
        ([pb.BatchIndices(index=[1, 0], lengths=[1, 1], samples=[0, 1])], "must increase"),
        ([pb.BatchIndices(index=[0], lengths=[0], samples=[])], "1 to"),
        ([pb.BatchIndices(index=[0], lengths=[1], samples=[0], end=True, total=0)], "ends with 0 batches"),
        ([pb.BatchIndices(index=[0], lengths=[1 << 23], samples=[0] * (1 << 23))], "ahead of need"),
    ],
)
def test_the_server_checks_every_index_list(
    server: Server, lists: list[pb.BatchIndices], needle: str
) -> None:
    err = _client_stream(server.address, lists)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert needle in (err.details() or "")


def test_index_lists_for_another_replica_are_refused(tensor_ds) -> None:
    with Server({"tensor": tensor_ds}, port=0, num_workers=0, replica_index=1, num_replicas=2) as srv:
        lists = [pb.BatchIndices(index=[2], lengths=[1], samples=[5])]
        err = _client_stream(srv.address, lists, replica_index=1, num_replicas=2)
    assert err is not None and "this replica's (b % 2 == 1)" in (err.details() or "")


def test_timeout_zero_means_no_limit_as_in_torch(server: Server) -> None:
    with DataLoader(server.address, "tensor", 10, timeout=0) as loader:
        assert loader.config.timeout > 10**6
        assert len(list(loader)) == 11


def test_batch_samplers_from_torch_are_run_too(server: Server, tensor_ds) -> None:
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    ref = TorchLoader(tensor_ds, batch_sampler=BatchSampler(RandomSampler(tensor_ds, generator=g1), 9, True))
    bs = BatchSampler(RandomSampler(tensor_ds, generator=g2), 9, True)
    with DataLoader(server.address, "tensor", batch_sampler=bs) as loader:
        assert len(loader) == len(ref) == N // 9
        assert_same(list(loader), list(ref))
