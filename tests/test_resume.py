"""state_dict() / load_state_dict() continue exactly where a loader stopped."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator

import pytest
import torch

from batchferry.client import DataLoader
from batchferry.errors import InvalidArgument
from batchferry.server import Server, parse_spec

from checks import assert_same


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


def test_a_failed_iter_keeps_the_epoch_the_resume_point_and_the_generator(tensor_ds) -> None:
    """iter() while the server is away raises, and moves nothing: the retry is torch's epoch."""
    from torch.utils.data import DataLoader as TorchLoader

    from batchferry.errors import ServerUnavailable

    from processes import ServeProcess, free_port

    spec = "synthetic:n=90,shape=3,seed=2"
    ds = parse_spec(spec)
    gen = torch.Generator().manual_seed(5)
    ref = TorchLoader(ds, 8, shuffle=True, generator=torch.Generator().manual_seed(5))
    expected = [list(ref) for _ in range(2)]
    port = free_port()
    loader = DataLoader(f"127.0.0.1:{port}", "syn", 8, True, generator=gen, timeout=0.5)
    state_before = gen.get_state()
    with pytest.raises(ServerUnavailable):
        iter(loader)
    assert torch.equal(gen.get_state(), state_before) and loader.epoch == 0
    server = ServeProcess(f"syn={spec}", port=port)
    server.start()
    try:
        it = _iter_retrying(loader)  # as a training script retries after ServerUnavailable
        head = [next(it) for _ in range(4)]
        state = loader.state_dict()
        loader.close()
        resumed = DataLoader(f"127.0.0.1:{port}", "syn", 8, True, timeout=0.5)
        resumed.load_state_dict(state)
        server.stop()
        with pytest.raises(ServerUnavailable):
            iter(resumed)  # fails: the resume point must survive it
        server.start()
        got = [head + list(_iter_retrying(resumed)), list(resumed)]
        resumed.close()
    finally:
        server.stop()
    for epoch in range(2):
        assert_same(got[epoch], expected[epoch])


def _iter_retrying(loader: DataLoader, timeout: float = 30.0) -> Iterator[object]:
    """iter() until the server answers; every failed attempt must leave the loader as it was."""
    from batchferry.errors import ServerUnavailable

    deadline = time.monotonic() + timeout
    before = loader.state_dict()
    while True:
        try:
            return iter(loader)
        except ServerUnavailable:
            assert loader.state_dict() == before
            if time.monotonic() > deadline:
                raise
