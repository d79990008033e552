"""GPU delivery: pinned buffer pool, non_blocking copies on a side stream. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry.client import DataLoader
from batchferry.server import Server

from checks import assert_same
from toy_datasets import Nested

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_batches_arrive_on_the_device_equal_to_the_dataset(server: Server, tensor_ds) -> None:
    with DataLoader(server.address, "tensor", 16, shuffle=True, seed=2, device="cuda") as loader:
        for _ in range(2):
            ours = list(loader)
        ref = TorchLoader(tensor_ds, 16, shuffle=True, generator=torch.Generator().manual_seed(2))
        list(ref)
        theirs = list(ref)
    for a, b in zip(ours, theirs):
        assert all(t.is_cuda for t in a)
        assert_same(a, b)


def test_consumer_stream_sees_completed_copies(server: Server) -> None:
    expected = list(TorchLoader(Nested(), batch_size=5))
    with DataLoader(server.address, "nested", 5, device="cuda", prefetch_factor=8) as loader:
        big = torch.randn(2048, 2048, device="cuda")
        for batch, ref in zip(loader, expected, strict=True):
            big = big @ big.T / 2048  # keep the consumer stream busy while copies run
            assert_same(batch, ref)
        torch.cuda.synchronize()


def test_pinned_pool_is_reused_and_pinned(server: Server) -> None:
    with DataLoader(server.address, "tensor", 10, pin_memory=True, prefetch_factor=2) as loader:
        x, _ = next(iter(loader))
        assert x.is_pinned()
        del x
        for _ in range(3):
            for batch in loader:
                del batch
        assert (
            loader._connection.pool.pin
            and loader._connection.pool.allocations <= loader._connection.pool.max_buffers
        )
    with DataLoader(server.address, "tensor", 10, device="cuda", prefetch_factor=2) as loader:
        for _ in range(3):
            for batch in loader:
                del batch
        torch.cuda.synchronize()
        assert loader._connection.pool.allocations <= loader._connection.pool.max_buffers


def test_cuda_batches_match_cpu_batches_bytewise(server: Server) -> None:
    with (
        DataLoader(server.address, "nested", 4) as cpu,
        DataLoader(server.address, "nested", 4, device="cuda") as gpu,
    ):
        for a, b in zip(cpu, gpu):
            assert_same(b, a)


@pytest.mark.parametrize("transport", ["grpc", "shm", "grpc+receivers"])
def test_grouped_small_batches_reach_the_device_and_pinned_buffers_equal_and_in_order(transport: str) -> None:
    # 4,000 samples in batches of 4: after the first few, batches travel dozens to a frame,
    # each copied on its own, the frame's buffer or slot freed after the last copy.
    ds = torch.utils.data.TensorDataset(torch.arange(16_000.0).view(4000, 4), torch.arange(4000))
    expected = list(TorchLoader(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    with Server({"t": ds}, port=0, num_workers=2) as srv:
        for options in ({"device": "cuda"}, {"pin_memory": True}):
            kind, _, receivers = transport.partition("+")
            with DataLoader(
                srv.address, "t", 4, shuffle=True, seed=3, transport=kind, receive_processes=bool(receivers),
                **options,
            ) as loader:  # fmt: skip
                got = [[t.cpu() for t in batch] for batch in loader]  # pinned batches kept: buffers in use
            assert_same(got, [list(b) for b in expected])


def test_receiver_slots_are_page_locked_in_place_and_copies_complete_before_reuse() -> None:
    """With receive_processes the device copies read the receiver's slots directly (each
    registered once): a slot goes back to the receiver, to be refilled, only after its
    copies have completed, so every batch on the device equals torch's."""
    ds = torch.utils.data.TensorDataset(torch.randn(512, 64, 256), torch.arange(512))
    ref = TorchLoader(ds, 32, shuffle=True, generator=torch.Generator().manual_seed(1))
    expected = [[list(b) for b in ref] for _ in range(2)]
    with Server({"t": ds}, port=0, num_workers=2) as srv, DataLoader(
        srv.address, "t", 32, shuffle=True, seed=1, transport="grpc", receive_processes=True, device="cuda"
    ) as loader:  # fmt: skip
        big = torch.randn(2048, 2048, device="cuda")
        for epoch in range(2):
            got = []
            for x, y in loader:
                big = big @ big.T / 2048  # the consumer stream lags the copies
                got.append([x.cpu(), y.cpu()])
            assert_same(got, expected[epoch])
        assert loader._connection.segments._mapped.registered  # the slots, page-locked once
