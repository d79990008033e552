"""state_dict() / load_state_dict() continue exactly where a loader stopped."""

from __future__ import annotations

import pickle

import pytest
import torch

from batchferry.client import DataLoader
from batchferry.errors import InvalidArgument
from batchferry.server import Server

from support import assert_same


def _run(address: str, epochs: int, **kw: object) -> list[list[object]]:
    with DataLoader(address, "tensor", 9, shuffle=True, **kw) as loader:  # type: ignore[arg-type]
        return [list(loader) for _ in range(epochs)]


@pytest.mark.parametrize("stop_at", [0, 1, 5, 11])
def test_resume_mid_epoch_equals_uninterrupted(server: Server, stop_at: int) -> None:
    expected = _run(server.address, 3, seed=7)
    first = DataLoader(server.address, "tensor", 9, shuffle=True, seed=7)
    got = [list(first)]  # epoch 0 complete
    it = iter(first)
    partial = [next(it) for _ in range(stop_at)]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # plain data
    first.close()
    assert all(isinstance(v, (int, str, bytes, bool)) for v in state.values())
    assert sum(len(v) for v in state.values() if isinstance(v, bytes)) < 16_384

    second = DataLoader(server.address, "tensor", 9, shuffle=True, seed=12345)  # seed is overridden
    second.load_state_dict(state)
    got.append(partial + list(second))
    got.append(list(second))
    second.close()
    for e in range(3):
        assert_same(got[e], expected[e])


def test_resume_with_user_generator_between_epochs(server: Server) -> None:
    expected = _run(server.address, 2, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    with DataLoader(server.address, "tensor", 9, shuffle=True, generator=gen) as loader:
        assert_same(list(loader), expected[0])
        state = loader.state_dict()
    assert state["batch"] == 0 and state["epoch"] == 1
    with DataLoader(server.address, "tensor", 9, shuffle=True, generator=torch.Generator()) as loader:
        loader.load_state_dict(state)
        assert_same(list(loader), expected[1])


def test_resume_sequential(server: Server, tensor_ds) -> None:
    with DataLoader(server.address, "tensor", 10) as loader:
        it = iter(loader)
        next(it), next(it), next(it)
        state = loader.state_dict()
    with DataLoader(server.address, "tensor", 10) as loader:
        loader.load_state_dict(state)
        rest = list(loader)
    assert_same(rest, list(torch.utils.data.DataLoader(tensor_ds, 10))[3:])


def test_load_state_dict_checks_fields(server: Server) -> None:
    loader = DataLoader(server.address, "tensor", 9, shuffle=True, seed=1)
    state = loader.state_dict()
    for key, value, needle in [
        ("version", 99, "version"),
        ("batch_size", 3, "batch_size"),
        ("dataset", "other", "dataset"),
        ("epoch", -1, "epoch"),
        ("generator_state", b"junk", "generator_state"),
        ("sampler_state", "text", "sampler_state"),
    ]:
        with pytest.raises(InvalidArgument, match=needle):
            loader.load_state_dict({**state, key: value})
    loader.close()
