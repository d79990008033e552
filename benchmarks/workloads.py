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
from PIL import Image
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


class JpegFolder:
    """JPEG files in class folders; decode, random 224 crop and horizontal flip per sample."""

    def __init__(self, root: Path, crop: int = 224) -> None:
        self.root = root
        self.crop = crop
        self.files = sorted(root.glob("*/*.jpg"))
        self.classes = sorted({f.parent.name for f in self.files})
        self._label = {c: i for i, c in enumerate(self.classes)}

    def __reduce__(self) -> tuple[Any, ...]:
        return (JpegFolder, (self.root, self.crop))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        top, left = (int(v) for v in torch.randint(0, arr.shape[0] - self.crop + 1, (2,)))
        arr = arr[top : top + self.crop, left : left + self.crop]
        if torch.rand(()) < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), self._label[path.parent.name]


def w3() -> JpegFolder:
    """2,000 JPEG files of 256x256 in 10 class folders."""
    n = _scaled(2000)
    root = data_dir() / f"w3-{n}"
    if not (root / "done").exists():
        rng = np.random.default_rng(3)
        base = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        for i in range(n):
            folder = root / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            # Smooth, photo-like content compresses like real images (noise would not).
            img = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((256, 256), Image.Resampling.BILINEAR)
            img.save(folder / f"{i:05d}.jpg", quality=90)
        (root / "done").touch()
    return JpegFolder(root)


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
    "W3": Workload("W3", "JPEG decode + random crop + flip", w3, 64, 25),
    "W4": Workload(
        "W4", "variable-length tokens, pad collate", w4, 64, 600, collate="pad", torch_collate=torch_pad
    ),
}
