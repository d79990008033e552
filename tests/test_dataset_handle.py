"""``loader.dataset``: the served dataset's length, structure and samples, and GetSample's limits."""

from __future__ import annotations

import grpc
import pytest
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_convert

from batchferry import errors, wire
from batchferry.client import DataLoader, RemoteDataset
from batchferry.server import Server
from batchferry.v1 import loader_pb2 as pb

from checks import assert_same
from toy_datasets import CorruptSample, Flaky, Nested, Plain


@pytest.mark.parametrize("name", ["tensor", "plain", "nested"])
def test_samples_are_what_torch_converts(server: Server, tensor_ds: Dataset, name: str) -> None:
    ds = {"tensor": tensor_ds, "plain": Plain(50), "nested": Nested()}[name]
    with DataLoader(server.address, name, 4) as loader:
        handle = loader.dataset
        assert isinstance(handle, RemoteDataset) and isinstance(handle, Dataset)
        assert handle.name == name and len(handle) == len(ds)
        for i in (0, 1, len(ds) - 1):
            assert_same(handle[i], default_convert(ds[i]))
        assert_same(handle[-1], default_convert(ds[len(ds) - 1]))


def test_indices_out_of_range_raise_index_error_so_iteration_stops(server: Server) -> None:
    with DataLoader(server.address, "plain", 4) as loader:
        n = 50
        with pytest.raises(IndexError, match=f"index {n} out of range"):
            loader.dataset[n]
        with pytest.raises(IndexError):
            loader.dataset[-n - 1]
        with pytest.raises(TypeError, match="integers"):
            loader.dataset["0"]  # type: ignore[index]
        assert len(list(loader.dataset)) == n


def test_the_structure_is_the_listing_s(server: Server) -> None:
    with DataLoader(server.address, "plain", 4) as loader:
        assert loader.dataset.sample_structure == "(Tensor[float32, 3], int)"
        assert "plain" in repr(loader.dataset)


def _get_sample(address: str, **fields: object) -> grpc.RpcError | pb.GetSampleResponse:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(wire.GET_SAMPLE, request_serializer=None, response_deserializer=None)
        try:
            return pb.GetSampleResponse.FromString(
                call(pb.GetSampleRequest(**fields).SerializeToString(), timeout=30)
            )
        except grpc.RpcError as exc:
            return exc


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"dataset": "nope", "index": 0}, grpc.StatusCode.NOT_FOUND, "dataset 'nope' not found"),
        ({"dataset": "plain", "index": -1}, grpc.StatusCode.INVALID_ARGUMENT, "index must be in [0, 50)"),
        ({"dataset": "plain", "index": 50}, grpc.StatusCode.INVALID_ARGUMENT, "index must be in [0, 50)"),
        ({"dataset": "x" * 300, "index": 0}, grpc.StatusCode.INVALID_ARGUMENT, "at most 256 characters"),
    ],
)
def test_a_bad_request_is_refused_naming_the_field(
    server: Server, fields: dict, code: grpc.StatusCode, words: str
) -> None:
    answer = _get_sample(server.address, **fields)
    assert isinstance(answer, grpc.RpcError)
    assert answer.code() == code and words in answer.details()


def test_malformed_bytes_are_refused_and_the_server_goes_on(server: Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(wire.GET_SAMPLE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\xff\xff\xff", timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    answer = _get_sample(server.address, dataset="plain", index=2)
    assert isinstance(answer, pb.GetSampleResponse)


def test_a_sample_above_max_batch_bytes_is_refused() -> None:
    big = torch.utils.data.TensorDataset(torch.zeros(2, 1 << 19))  # 2 MiB samples
    with Server({"big": big}, port=0, num_workers=1, max_batch_bytes=1 << 20) as srv:
        with (
            DataLoader(srv.address, "big", 1) as loader,
            pytest.raises(errors.ResourceExhausted, match="max_batch_bytes"),
        ):
            loader.dataset[0]


def test_a_sample_the_dataset_fails_to_build_raises_its_error_and_the_next_comes() -> None:
    flaky = Flaky(10, {3: "key", 4: "own"})
    with (
        Server({"flaky": flaky}, port=0, num_workers=1) as srv,
        DataLoader(srv.address, "flaky", 2) as loader,
    ):
        with pytest.raises(KeyError) as caught:
            loader.dataset[3]
        assert isinstance(caught.value, errors.DatasetError)
        assert "sample 3" in str(caught.value) and "corrupt record 3" in str(caught.value)
        with pytest.raises(CorruptSample):
            loader.dataset[4]
        assert_same(loader.dataset[5], default_convert(flaky[5]))
        assert srv.ring.free_slots == srv.ring.num_slots  # no slot kept for them
