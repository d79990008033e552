"""The workloads of BENCHMARKS.md: datasets built once into a cache directory.

Servers load them with ``python:batchferry.benchmarks.workloads:NAME`` specs, so
the data directory travels in ``BATCHFERRY_BENCH_DATA``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import TensorDataset

from batchferry.server.datasets import NpyDataset

DATA_ENV = "BATCHFERRY_BENCH_DATA"
SCALE_ENV = "BATCHFERRY_BENCH_SCALE"  # < 1 shrinks every dataset (for smoke tests)


def data_dir() -> Path:
    path = Path(os.environ.get(DATA_ENV, Path(__file__).resolve().parent / ".data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _scaled(n: int) -> int:
    return max(1024, int(n * float(os.environ.get(SCALE_ENV, "1"))))


def w1() -> TensorDataset:
    """1,000,000 x (float32[2], int64 label), in memory."""
    n = _scaled(1_000_000)
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 2, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def w2() -> NpyDataset:
    """8,192 x uint8[3,224,224] in one memory-mapped .npy, with int64 labels."""
    n = _scaled(8192)
    root = data_dir() / f"w2-{n}"
    images, labels = root / "images.npy", root / "labels.npy"
    if not labels.exists():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(2)
        arr = np.lib.format.open_memmap(images.with_suffix(".tmp.npy"), "w+", np.uint8, (n, 3, 224, 224))
        for start in range(0, n, 512):
            stop = min(n, start + 512)
            arr[start:stop] = rng.integers(0, 256, size=(stop - start, 3, 224, 224), dtype=np.uint8)
        arr.flush()
        del arr
        images.with_suffix(".tmp.npy").rename(images)
        np.save(labels, rng.integers(0, 1000, size=n, dtype=np.int64))
    return NpyDataset(images, labels)


class VarLenTokens:
    """int64 token sequences of length 16..512 from one memory-mapped flat array."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = np.load(root / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(root / "offsets.npy")

    def __reduce__(self) -> tuple[Any, ...]:
        return (VarLenTokens, (self.root,))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.tokens[self.offsets[i] : self.offsets[i + 1]]))


def w4() -> VarLenTokens:
    n = _scaled(100_000)
    root = data_dir() / f"w4-{n}"
    if not (root / "offsets.npy").exists():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(4)
        lengths = rng.integers(16, 513, size=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(root / "tokens.npy", rng.integers(0, 50_000, size=int(offsets[-1]), dtype=np.int64))
        np.save(root / "offsets.npy", offsets)
    return VarLenTokens(root)


def torch_pad(batch: Sequence[torch.Tensor]) -> torch.Tensor:
    return pad_sequence(list(batch), batch_first=True, padding_value=0)


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    factory: Callable[[], Any]
    batch_size: int
    batches: int  # measured per repetition, after the first
    collate: str = "default"
    torch_collate: Callable[..., Any] | None = None
    unit: str = "batches/s"
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"python:batchferry.benchmarks.workloads:{self.factory.__name__}"


WORKLOADS = {
    "W1": Workload("W1", "tiny samples, per-batch overhead", w1, 256, 1500),
    "W2": Workload("W2", "224x224 images from a memory map", w2, 256, 24, unit="GB/s"),
    "W4": Workload(
        "W4", "variable-length tokens, pad collate", w4, 64, 600, collate="pad", torch_collate=torch_pad
    ),
}
