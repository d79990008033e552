from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from batchferry.server import Server

from support import Nested, Plain, VarLen, leaked_segments


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = leaked_segments()
    if left:
        print(f"\nshared-memory segments left behind: {left}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tensor_ds() -> torch.utils.data.TensorDataset:
    x = torch.arange(103 * 4, dtype=torch.float32).reshape(103, 4)
    return torch.utils.data.TensorDataset(x, torch.arange(103) % 5)


@pytest.fixture(scope="session")
def server(tensor_ds: torch.utils.data.TensorDataset) -> Iterator[Server]:
    """One real server with two worker processes for the whole session."""
    datasets = {"tensor": tensor_ds, "plain": Plain(50), "nested": Nested(), "varlen": VarLen()}
    with Server(datasets, host="127.0.0.1", port=0, num_workers=2) as srv:
        yield srv
