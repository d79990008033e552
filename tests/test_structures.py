"""Batches keep the collate's structure and the dataset's dtypes."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import TensorDataset

from batchferry.client import DataLoader
from batchferry.errors import DatasetError
from batchferry.server import Server, pad_collate

from checks import assert_same
from toy_datasets import Nested, Plain, Point, Points, PointsAtOnce, Reading, Readings, VarLen, sum_collate


def test_nested_structures_and_dtypes(server: Server) -> None:
    with DataLoader(server.address, "nested", 5) as loader:
        ours = list(loader)
    theirs = list(TorchLoader(Nested(), batch_size=5))
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert_same(a, b)
    first = ours[0]
    assert first["bf16"].dtype == torch.bfloat16 and first["scalar"].shape == (5,)
    assert first["noncontig"].is_contiguous() and first["name"] == [f"sample-{i}" for i in range(5)]


def test_batches_are_writable_and_independent(server: Server) -> None:
    with DataLoader(server.address, "tensor", 10) as loader:
        batches = list(loader)
        batches[0][0].fill_(-1)  # a caller may write into its batch
        again = list(loader)
    assert torch.equal(again[0][0][0], torch.arange(4, dtype=torch.float32))
    assert not torch.equal(batches[0][0], again[0][0])


def test_kept_batches_are_not_overwritten(server: Server, tensor_ds) -> None:
    # prefetch 1: the pool has 3 buffers for 11 batches; kept ones must not be reused.
    with DataLoader(server.address, "tensor", 10, prefetch_factor=1) as loader:
        kept = list(loader)
    assert_same(kept, list(TorchLoader(tensor_ds, batch_size=10)))


def test_buffers_are_reused_when_batches_are_dropped(server: Server) -> None:
    with DataLoader(server.address, "tensor", 10, prefetch_factor=2) as loader:
        for _ in range(3):
            for batch in loader:
                del batch
        assert loader._connection.pool.allocations <= loader._connection.pool.max_buffers


@pytest.mark.parametrize("pin_memory", [True, False])
def test_pin_memory_without_cuda_is_harmless(server: Server, pin_memory: bool) -> None:
    with DataLoader(server.address, "tensor", 50, pin_memory=pin_memory) as loader:
        x, _ = next(iter(loader))
    assert x.device.type == "cpu"
    assert x.is_pinned() == (pin_memory and torch.cuda.is_available())


def test_pad_collate_and_user_collates() -> None:
    ds = TensorDataset(torch.arange(40, dtype=torch.float32).reshape(20, 2))
    varlen = VarLen()
    collates = {"sum": sum_collate, "pad_minus1": pad_collate(-1)}
    with Server({"varlen": varlen, "xy": ds}, collates=collates, port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "varlen", 8, collate_fn="pad") as loader:
            padded = list(loader)
        with DataLoader(srv.address, "varlen", 8, collate_fn="pad_minus1") as loader:
            padded_m1 = list(loader)
        with DataLoader(srv.address, "xy", 6, collate_fn="sum") as loader:
            sums = list(loader)
    start = 0
    for (seqs, lengths), (seqs_m1, _) in zip(padded, padded_m1):
        samples = [varlen[i] for i in range(start, start + len(lengths))]
        longest = max(n for _, n in samples)
        assert seqs.shape == (len(samples), longest) and seqs.dtype == torch.int64
        assert lengths.tolist() == [n for _, n in samples]
        for row, row_m1, (seq, n) in zip(seqs, seqs_m1, samples):
            assert torch.equal(row[:n], seq) and torch.equal(row_m1[:n], seq)
            assert (row[n:] == 0).all() and (row_m1[n:] == -1).all()
        start += len(lengths)
    assert start == len(varlen)
    expected = [sum_collate([ds[i] for i in range(s, min(s + 6, 20))]) for s in range(0, 20, 6)]
    assert_same(sums, expected)


def test_default_collate_errors_like_torch() -> None:
    # default (not pad) refuses tensors of different sizes, as torch's does.
    with Server({"varlen": VarLen()}, port=0, num_workers=0) as srv:
        with (
            DataLoader(srv.address, "varlen", 4) as loader,
            pytest.raises(DatasetError, match="batch 0"),
        ):
            next(iter(loader))


def test_numpy_dataset_rows(tmp_path) -> None:
    data = np.random.default_rng(0).integers(0, 255, size=(30, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(30, dtype=np.int64)
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "y.npy", labels)
    spec = f"npy:{tmp_path / 'x.npy'},labels={tmp_path / 'y.npy'}"
    with Server({"img": spec}, port=0, num_workers=1) as srv:
        with DataLoader(srv.address, "img", 8, shuffle=True, seed=1) as loader:
            batches = list(loader)
    order = torch.randperm(30, generator=_after_base_draw(1)).tolist()
    got = torch.cat([b[0] for b in batches])
    assert torch.equal(got, torch.from_numpy(data[order]))
    assert torch.cat([b[1] for b in batches]).tolist() == order


def _after_base_draw(seed: int) -> torch.Generator:
    gen = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    return gen


@pytest.mark.parametrize(
    "labels",
    [None, np.arange(30, dtype=np.int32), np.linspace(0, 1, 30), np.arange(30) % 2 == 0],
    ids=["none", "int32", "float", "bool"],
)
def test_vectorised_npy_gather_equals_per_sample_collate(tmp_path, labels) -> None:
    from batchferry.server import NpyDataset

    data = np.random.default_rng(1).standard_normal((30, 5)).astype(np.float16)
    np.save(tmp_path / "x.npy", data)
    spec = f"npy:{tmp_path / 'x.npy'}"
    if labels is not None:
        np.save(tmp_path / "y.npy", labels)
        spec += f",labels={tmp_path / 'y.npy'}"
    ds = NpyDataset(tmp_path / "x.npy", tmp_path / "y.npy" if labels is not None else None)
    ref = TorchLoader(ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(0))
    with Server({"d": spec}, port=0, num_workers=0) as srv:
        with DataLoader(srv.address, "d", 7, shuffle=True, seed=0) as loader:
            assert_same(list(loader), list(ref))


def test_worker_processes_gather_array_datasets_vectorised(tensor_ds) -> None:
    with Server({"t": tensor_ds, "p": Plain(20)}, port=0, num_workers=2) as srv:
        with DataLoader(srv.address, "t", 10) as loader:
            assert_same(list(loader), list(TorchLoader(tensor_ds, 10)))
        assert srv.service.batches_gathered == srv.service.batches_built == 11
        with DataLoader(srv.address, "p", 10) as loader:
            list(loader)
        assert srv.service.batches_gathered == 11 and srv.service.batches_built == 13


@pytest.fixture(scope="module")
def named() -> Iterator[Server]:
    datasets = {"points": Points(), "at_once": PointsAtOnce(), "readings": Readings()}
    with Server(datasets, port=0, num_workers=2) as srv:
        yield srv


@pytest.mark.parametrize("dataset", ["points", "at_once"])
@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_namedtuple_samples_collate_to_their_class(named: Server, dataset: str, transport: str) -> None:
    ds = Points() if dataset == "points" else PointsAtOnce()
    theirs = list(TorchLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2)))
    with DataLoader(named.address, dataset, 8, shuffle=True, seed=2, transport=transport) as loader:
        ours = list(loader)
    assert_same(ours, theirs)  # the same class, not a tuple
    assert all(type(b) is Point for b in ours)
    assert torch.equal(ours[0].x, theirs[0].x) and ours[0].y.tolist() == theirs[0].y.tolist()
    assert ours[-1].x.shape == (6, 3)


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_namedtuple_class_the_client_lacks_comes_back_equivalent(named: Server, transport: str) -> None:
    theirs = list(TorchLoader(Readings(), batch_size=5))
    with DataLoader(named.address, "readings", 5, transport=transport) as loader:
        ours = list(loader)
    assert Reading.__module__ not in sys.modules  # the server's class: not found here, not imported
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert type(a) is not Reading and type(a).__name__ == "Reading" and a._fields == b._fields
        assert_same(list(a), list(b))
        assert a.where == b.where and torch.equal(a.value, b.value)
    assert len({type(b) for b in ours}) == 1  # one class for the stream's batches
