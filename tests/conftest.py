from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from batchferry.client.options import COMPRESSION_ENV
from batchferry.server import Server
from batchferry.server.compression import MIN_RATIO_ENV

from checks import leaked_segments
from processes import ServeProcess, serving
from toy_datasets import RESTART_SPEC, Nested, Plain, VarLen

# BATCHFERRY_TEST_COMPRESSION=lz4 (or zstd) runs the tests with every loader's byte
# stream compressed, every batch included (even those that would go raw), through the
# variables the product reads; the servers the tests start as processes inherit them.
_COMPRESSION = os.environ.get("BATCHFERRY_TEST_COMPRESSION")
if _COMPRESSION:
    os.environ.setdefault(COMPRESSION_ENV, _COMPRESSION)
    os.environ.setdefault(MIN_RATIO_ENV, "0")


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


@pytest.fixture
def restartable() -> Iterator[ServeProcess]:
    """``batchferry serve`` of ``syn`` (RESTART_SPEC) in a process of its own, to kill and start again."""
    with serving(f"syn={RESTART_SPEC}") as server:
        yield server
