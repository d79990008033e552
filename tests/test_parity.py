"""Batches and order equal torch's DataLoader (num_workers=0), epoch after epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader as TorchLoader

from batchferry.client import DataLoader
from batchferry.server import Server

from checks import assert_same
from toy_datasets import Plain

EPOCHS = 3


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("batch_size", [1, 10, 103, 200])
@pytest.mark.parametrize("how", ["generator", "seed"])
def test_epochs_match_torch(
    server: Server, tensor_ds, shuffle: bool, drop_last: bool, batch_size: int, how: str
) -> None:
    ref_gen = torch.Generator().manual_seed(1234)
    ref = TorchLoader(
        tensor_ds, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=ref_gen
    )
    gen = torch.Generator().manual_seed(1234)
    kwargs = {"generator": gen} if how == "generator" else {"seed": 1234}
    with DataLoader(server.address, "tensor", batch_size, shuffle, drop_last=drop_last, **kwargs) as loader:
        assert len(loader) == len(ref)
        for epoch in range(EPOCHS):
            ours, theirs = list(loader), list(ref)
            assert len(ours) == len(theirs), f"epoch {epoch}"
            for i, (a, b) in enumerate(zip(ours, theirs)):
                assert_same(a, b, f"epoch {epoch} batch {i}")
        if how == "generator":
            # The generator advanced exactly as torch's did.
            assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_unseeded_follows_global_rng_like_torch(server: Server, tensor_ds) -> None:
    torch.manual_seed(99)
    theirs = [list(TorchLoader(tensor_ds, batch_size=16, shuffle=True)) for _ in range(2)]
    torch.manual_seed(99)
    with DataLoader(server.address, "tensor", 16, shuffle=True) as loader:
        ours = [list(loader) for _ in range(2)]
    assert_same(ours, theirs)


def test_unseeded_epochs_differ(server: Server) -> None:
    with DataLoader(server.address, "tensor", 8, shuffle=True) as loader:
        first, second = list(loader), list(loader)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, second))


def test_per_sample_dataset_and_several_loaders_at_once(server: Server) -> None:
    ds = Plain(50)
    loaders = [DataLoader(server.address, "plain", 7, shuffle=True, seed=s) for s in range(3)]
    iters = [iter(loader) for loader in loaders]
    refs = [
        iter(TorchLoader(ds, 7, shuffle=True, generator=torch.Generator().manual_seed(s))) for s in range(3)
    ]
    # Interleave the three streams batch by batch.
    for _ in range(len(loaders[0])):
        for it, ref in zip(iters, refs):
            assert_same(next(it), next(ref))
    for loader in loaders:
        loader.close()


def test_set_epoch_jumps_to_that_epoch(server: Server, tensor_ds) -> None:
    ref = TorchLoader(tensor_ds, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(5))
    epochs = [list(ref) for _ in range(3)]
    with DataLoader(server.address, "tensor", 20, shuffle=True, seed=5) as loader:
        loader.set_epoch(2)
        assert_same(list(loader), epochs[2])
        loader.set_epoch(0)
        assert_same(list(loader), epochs[0])
        assert_same(list(loader), epochs[1])


def test_break_then_new_iteration_matches_torch(server: Server, tensor_ds) -> None:
    ref = TorchLoader(tensor_ds, batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(8))
    with DataLoader(server.address, "tensor", 10, shuffle=True, seed=8) as loader:
        for loader_ in (ref, loader):
            it = iter(loader_)
            next(it), next(it)
        # torch's second iterator starts from where the broken one left the generator.
        assert_same(list(loader), list(ref))
