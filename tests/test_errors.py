"""Every bad input gets the right status and a message naming it; the server keeps serving."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
import torch

from batchferry import errors, wire
from batchferry.client import DataLoader
from batchferry.server import Server
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from toy_datasets import Crashing, Failing


def _open(**fields: object) -> bytes:
    base: dict[str, object] = {"dataset": "tensor", "batch_size": 4, "credits": 2}
    base.update(fields)
    return pb.ClientMessage(open=pb.OpenStream(**base)).SerializeToString()  # type: ignore[arg-type]


def _stream(address: str, messages: list[bytes]) -> list[bytes]:
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        return list(call(iter(messages), timeout=10))


def _status(address: str, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _stream(address, messages)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(
    ("fields", "code", "needle"),
    [
        ({"dataset": "nope"}, grpc.StatusCode.NOT_FOUND, "dataset 'nope' not found"),
        ({"dataset": ""}, grpc.StatusCode.INVALID_ARGUMENT, "dataset: required"),
        ({"batch_size": 0}, grpc.StatusCode.INVALID_ARGUMENT, "batch_size must be >= 1, got 0"),
        ({"batch_size": -5}, grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
        ({"collate": "nope"}, grpc.StatusCode.NOT_FOUND, "collate 'nope' not found"),
        ({"credits": 0}, grpc.StatusCode.INVALID_ARGUMENT, "credits"),
        ({"credits": 10**6}, grpc.StatusCode.INVALID_ARGUMENT, "credits"),
        ({"start_batch": 999}, grpc.StatusCode.INVALID_ARGUMENT, "start_batch"),
        ({"epoch": -1}, grpc.StatusCode.INVALID_ARGUMENT, "epoch"),
        ({"chunk_bytes": 10}, grpc.StatusCode.INVALID_ARGUMENT, "chunk_bytes"),
        ({"shuffle": True}, grpc.StatusCode.INVALID_ARGUMENT, "sampler_state: required"),
        (
            {"shuffle": True, "sampler_state": b"\x01\x02"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampler_state",
        ),
    ],
)
def test_bad_open_fields(
    server: Server, fields: dict[str, object], code: grpc.StatusCode, needle: str
) -> None:
    got, details = _status(server.address, [_open(**fields)])
    assert got == code and needle in details


def test_malformed_bytes(server: Server) -> None:
    code, details = _status(server.address, [b"\xff\xff\xff\xff garbage"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed ClientMessage" in details
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(wire.LIST_DATASETS, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ListDatasetsRequest" in info.value.details()


def test_protocol_violations(server: Server) -> None:
    credit = pb.ClientMessage(credit=pb.Credit(batches=1)).SerializeToString()
    code, details = _status(server.address, [credit])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first message" in details
    code, details = _status(server.address, [])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "open" in details
    # A second open, or a garbage credit, after a valid open ends that stream only.
    code, details = _status(server.address, [_open(credits=1), _open()])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "credit" in details


def test_client_raises_documented_errors(server: Server) -> None:
    with pytest.raises(errors.NotFound, match="dataset 'missing' not found"):
        len(DataLoader(server.address, "missing"))
    with pytest.raises(errors.NotFound, match="collate 'nope'"):
        next(iter(DataLoader(server.address, "tensor", 4, collate_fn="nope")))
    for kwargs, needle in [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"prefetch_factor": 0}, "prefetch_factor"),
        ({"timeout": -1}, "timeout"),
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"mode": "weird"}, "mode"),
        ({"seed": 1, "generator": torch.Generator()}, "generator or seed"),
        ({"device": "tpu"}, "device"),
        ({"collate_fn": ""}, "collate_fn"),
    ]:
        with pytest.raises(errors.InvalidArgument, match=needle):
            DataLoader(server.address, "tensor", **kwargs)  # type: ignore[arg-type]
    assert issubclass(errors.InvalidArgument, ValueError)


def test_unreachable_server_times_out_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loader = DataLoader(f"127.0.0.1:{port}", "x", timeout=0.5)
    with pytest.raises(errors.ServerUnavailable, match="not reachable"):
        iter(loader)
    loader.close()


def test_dataset_errors_reach_the_client_and_others_keep_going(tensor_ds) -> None:
    with Server({"bad": Failing(), "good": tensor_ds}, port=0, num_workers=2) as srv:
        with DataLoader(srv.address, "bad", 4) as loader:
            it = iter(loader)
            for _ in range(3):
                next(it)
            with pytest.raises(
                errors.DatasetError,
                match=r"\(dataset 'bad', batch 3\)\.\n(?s:.*)KeyError: .*corrupt record 13",
            ):
                next(it)
        with DataLoader(srv.address, "good", 10) as loader:
            assert_same(list(loader), list(torch.utils.data.DataLoader(tensor_ds, 10)))


def test_worker_crash_fails_its_batch_the_epoch_goes_on_and_the_pool_recovers(tensor_ds) -> None:
    with Server({"crash": Crashing(), "good": tensor_ds}, port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "crash", 4) as loader:
            it = iter(loader)
            got = [next(it)]
            # Sample 5 ends its worker (os._exit): batch 1 fails as torch's worker death does.
            with pytest.raises(RuntimeError, match=r"batch 1\)\.\nworker process \d+ died") as info:
                next(it)
            assert isinstance(info.value, errors.DatasetError)
            got += list(it)
        assert_same(got, [torch.arange(b * 4, b * 4 + 4).view(4, 1) for b in (0, 2, 3)])
        with DataLoader(srv.address, "good", 10) as loader:
            assert len(list(loader)) == 11


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_batches_larger_than_their_slot_grow_it(transport: str) -> None:
    from toy_datasets import Growing

    ds = Growing()
    with Server({"g": ds}, port=0, num_workers=1, slots=2) as srv:
        # Slots are sized from sample 0; every later batch outgrows them.
        with DataLoader(
            srv.address, "g", 1, pin_memory=True, chunk_bytes=1 << 20, transport=transport
        ) as loader:
            batches = list(loader)
    assert len(batches) == len(ds)
    for i, b in enumerate(batches):
        assert torch.equal(b[0], ds[i])


def test_batch_larger_than_shm_budget_is_resource_exhausted() -> None:
    from toy_datasets import Big

    with Server({"big": Big()}, port=0, num_workers=0, slots=2, shm_bytes=4 << 20) as srv:
        with (
            DataLoader(srv.address, "big", 4) as loader,
            pytest.raises(errors.ResourceExhausted, match="budget"),
        ):
            list(loader)


def test_abandoned_iterators_release_server_slots(server: Server) -> None:
    for _ in range(30):
        with DataLoader(server.address, "tensor", 2, prefetch_factor=8) as loader:
            next(iter(loader))
    with DataLoader(server.address, "tensor", 10) as loader:
        assert len(list(loader)) == 11


def _never_ending() -> Iterator[bytes]:
    yield _open(credits=1)


def test_server_config_errors_name_the_setting(tensor_ds) -> None:
    from batchferry.server import ServerConfig

    for kwargs, needle in [
        ({"port": 70000}, "port"),
        ({"num_workers": -1}, "num_workers"),
        ({"chunk_bytes": 10}, "chunk_bytes"),
        ({"max_streams": 0}, "max_streams"),
        ({"replica_index": 2, "num_replicas": 2}, "replica_index"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"num_replicas": 5000}, "num_replicas must be in \\[1, 1024\\]"),
        ({"shm_bytes": 1000}, "shm_bytes"),
        ({"job_idle_s": 0}, "job_idle_s"),
    ]:
        with pytest.raises(ValueError, match=needle):
            ServerConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one dataset"):
        Server({})
