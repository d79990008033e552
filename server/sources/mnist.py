"""``mnist:ROOT[,split=train|test][,variant=NAME]``: MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST).

Found where torchvision downloads them (``ROOT/MNIST/raw/train-images-idx3-ubyte``,
``ROOT/FashionMNIST/raw/...``), in ``ROOT/raw/`` or in ``ROOT`` itself, plain or
``.gz``. Samples are ``(uint8 tensor [1, 28, 28], int label)`` in file order; a
batch of them is ``(uint8 [B, 1, 28, 28], int64 [B])``, gathered with one take per
field. Plain files are memory-mapped, gzipped ones decompressed once per process.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import SampleError, relative, split_options
from ._gather import Gather, take_array

__all__ = ["MnistDataset", "from_spec"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The folder names torchvision's MNIST-format datasets download into.
VARIANTS = ("MNIST", "FashionMNIST", "KMNIST")
_UBYTE = 0x08


@dataclass(frozen=True)
class _Idx:
    path: Path
    shape: tuple[int, ...]
    offset: int  # bytes of header


def _header(path: Path, root: Path, ndim: int) -> _Idx:
    """Check an IDX file's magic and size, so a corrupt file fails at start, not mid-epoch."""
    name = relative(path, root)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                head = f.read(4 + 4 * ndim)
                size = len(head) + sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
        else:
            with path.open("rb") as f:
                head = f.read(4 + 4 * ndim)
            size = path.stat().st_size
    except (OSError, EOFError) as exc:
        raise ValueError(f"{name}: cannot read: {exc}") from exc
    if len(head) < 4 + 4 * ndim or head[:2] != b"\0\0" or head[2] != _UBYTE or head[3] != ndim:
        raise ValueError(f"{name}: not an IDX file of {ndim}-d unsigned bytes (bad magic {head[:4].hex()})")
    shape = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if size != expected:
        raise ValueError(f"{name}: {size} bytes, but its header {shape} needs {expected}; truncated?")
    return _Idx(path, shape, 4 + 4 * ndim)


def _read(idx: _Idx) -> np.ndarray:
    if idx.path.suffix == ".gz":
        with gzip.open(idx.path, "rb") as f:
            raw = f.read()
        return np.frombuffer(raw, np.uint8, offset=idx.offset).reshape(idx.shape)
    return np.memmap(idx.path, np.uint8, "r", offset=idx.offset, shape=idx.shape)


def find_files(root: Path, split: str, variant: str | None = None) -> tuple[Path, Path]:
    """The images and labels files of ``split`` under ``root`` (see the module docstring)."""
    names = _FILES[split]
    folders = [root / v / "raw" for v in ([variant] if variant else VARIANTS)]
    if not variant:
        folders = [root, root / "raw", *folders]
    found: list[tuple[Path, Path]] = []
    for folder in folders:
        for suffix in ("", ".gz"):
            images, labels = folder / (names[0] + suffix), folder / (names[1] + suffix)
            if images.is_file() and labels.is_file():
                found.append((images, labels))
                break
    if not found:
        where = ", ".join(relative(f, root) + "/" for f in folders)
        raise ValueError(f"no {names[0]} and {names[1]} (or .gz) in {root} (looked in {where})")
    if len(found) > 1 and not variant:
        kinds = [p[0].parent.parent.name for p in found]
        raise ValueError(
            f"{root} holds several MNIST-format sets ({', '.join(kinds)}); choose one with variant="
        )
    return found[0]


class MnistDataset:
    """MNIST-format images and labels (``split`` ``"train"`` or ``"test"``).

    Examples:
        >>> ds = MnistDataset("/data", split="test")  # doctest: +SKIP
        >>> image, label = ds[0]                      # uint8 [1, 28, 28], int
    """

    def __init__(self, root: str | Path, split: str = "train", variant: str | None = None) -> None:
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.root, self.split, self.variant = Path(root), split, variant
        images, labels = find_files(self.root, split, variant)
        self._images = _header(images, self.root, 3)
        self._labels = _header(labels, self.root, 1)
        if self._images.shape[0] != self._labels.shape[0]:
            raise ValueError(
                f"{relative(images, self.root)} has {self._images.shape[0]} images but "
                f"{relative(labels, self.root)} has {self._labels.shape[0]} labels"
            )
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    # Pickle by path; every process opens (or decompresses) the files itself on first use.
    def __reduce__(self) -> tuple[Any, ...]:
        return (MnistDataset, (self.root, self.split, self.variant))

    @property
    def files(self) -> tuple[Path, Path]:
        return self._images.path, self._labels.path

    def _open(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            try:
                images = _read(self._images)
            except (OSError, EOFError, ValueError) as exc:
                raise SampleError(index, relative(self._images.path, self.root), str(exc)) from exc
            try:
                labels = _read(self._labels).astype(np.int64)
            except (OSError, EOFError, ValueError) as exc:
                raise SampleError(index, relative(self._labels.path, self.root), str(exc)) from exc
            self._arrays = (images.reshape(len(images), 1, *images.shape[1:]), labels)
        return self._arrays

    def __len__(self) -> int:
        return self._images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self._open(index)
        return torch.from_numpy(np.array(images[index])), int(labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = np.asarray(indices, dtype=np.int64)
        images, labels = self._open(int(idx[0]) if len(idx) else 0)
        return list(zip(torch.from_numpy(images[idx]), labels[idx].tolist(), strict=True))

    def batch_gatherer(self) -> Gather:
        def gather(idx: np.ndarray, writer: Any) -> list[torch.Tensor]:
            images, labels = self._open(int(idx[0]) if len(idx) else 0)
            return [take_array(images, idx, writer), take_array(labels, idx, writer)]

        return gather


def from_spec(rest: str) -> MnistDataset:
    root, opts = split_options(rest, {"split", "variant"})
    if not Path(root).is_dir():
        raise ValueError(f"no such directory {root!r}")
    return MnistDataset(root, opts.get("split", "train"), opts.get("variant"))
