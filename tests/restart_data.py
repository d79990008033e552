"""Samples that are their own indices, served by ``batchferry serve`` processes to kill and restart."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import Subset

from batchferry.client import DataLoader

import processes
from processes import ServeProcess

SAMPLES = 300
BATCH = 5
SEED = 7


def ids_file(directory: Path) -> Path:
    """``SAMPLES`` rows, row i holding i: a batch names the samples it carries."""
    path = directory / "ids.npy"
    np.save(path, np.arange(SAMPLES, dtype=np.int64).reshape(SAMPLES, 1))
    return path


@contextlib.contextmanager
def serving(directory: Path, extra: Sequence[str] = ()) -> Iterator[ServeProcess]:
    """``ids`` served by a killable process on a fixed port."""
    with processes.serving(f"ids=npy:{ids_file(directory)}", extra) as server:
        yield server


def loader(address: str, mode: str, job: str, **kw: Any) -> DataLoader[Any]:
    return DataLoader(
        address, "ids", BATCH, True, seed=SEED, mode=mode, job=job, timeout=30, transport="grpc", **kw
    )


def ids(batches: Sequence[Any]) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].tolist()]


def torch_epoch(epoch: int = 0) -> list[torch.Tensor]:
    """torch's batches of a job's epoch: DistributedSampler's order for one rank (seed + epoch)."""
    data = torch.arange(SAMPLES, dtype=torch.int64).reshape(SAMPLES, 1)
    order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    return list(TorchLoader(Subset(data, order), BATCH))  # type: ignore[arg-type]
