"""Datasets for the torch parity tests (importable by spawned server workers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

# Odd, so that no batch size below divides it and drop_last always matters.
N = 43


def rows() -> TensorDataset:
    """N samples of (float32[3], int64 label): what most trainers feed."""
    x = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
    return TensorDataset(x, torch.arange(N) % 5)


class Point(NamedTuple):
    """A namedtuple sample: default_collate keeps its class, default_convert too."""

    x: torch.Tensor
    label: int


# One sample kind per dataset, so that each leaf and container kind fails on its own.
SAMPLES: dict[str, Callable[[int], Any]] = {
    "dict": lambda i: {"x": torch.tensor([i, -i], dtype=torch.float32), "y": i},
    "tuple": lambda i: (torch.tensor([i, i + 1]), i % 3),
    "list": lambda i: [torch.full((2, 2), i, dtype=torch.int16), i / 8, i],
    "nested": lambda i: {
        "a": (torch.tensor([i]), [i, {"b": torch.tensor(i, dtype=torch.uint8)}]),
        "c": [{"d": i % 2 == 0}],
    },
    "namedtuple": lambda i: Point(torch.tensor([i, 2 * i], dtype=torch.int32), i),
    "str": lambda i: f"item-{i}",
    "str_in_dict": lambda i: {"name": f"item-{i}", "x": torch.tensor([float(i)])},
    "numbers": lambda i: (i, i / 4, i % 3 == 0),
    "numpy": lambda i: (
        np.arange(3, dtype=np.int32) + i,
        np.full((2, 2), i / 2, dtype=np.float64),
        np.float32(i / 4),
        np.int64(i),
        np.bool_(i % 2),
    ),
    "tensor_0d": lambda i: torch.tensor(i * 1.5),
    "tensor_0d_pair": lambda i: (torch.tensor(i), torch.tensor(i % 2 == 1)),
}


class Samples(Dataset[Any]):
    """N samples of one kind from ``SAMPLES``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        return SAMPLES[self.kind](i)


class CorruptSample(Exception):
    """A dataset's own exception class."""


# Samples that raise: batches of 4 in order fail at batches 1 and 4, not at the ends.
BAD = frozenset({5, 6, 17})
ERROR_LENGTH = 24


class Raising(Dataset[torch.Tensor]):
    """``tensor([i, i * i])``, except samples in ``BAD``: KeyError (``kind="key"``) or
    CorruptSample (``kind="custom"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __len__(self) -> int:
        return ERROR_LENGTH

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in BAD:
            if self.kind == "key":
                raise KeyError(f"no record {i}")
            raise CorruptSample(f"record {i} is corrupt")
        return torch.tensor([i, i * i])


def datasets() -> dict[str, Dataset[Any]]:
    """Every dataset the parity tests read, by the name the server serves it under."""
    served: dict[str, Dataset[Any]] = {"rows": rows(), "key": Raising("key"), "custom": Raising("custom")}
    served.update({f"samples-{kind}": Samples(kind) for kind in SAMPLES})
    return served
