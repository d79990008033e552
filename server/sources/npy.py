"""``npy:PATH[,labels=PATH]``: rows of a memory-mapped ``.npy`` file, optionally with labels.

Either path may be a URL of object storage (see :mod:`._remote`): the file is fetched
into the cache whole, then mapped from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import split_options
from ._gather import Gather, collated_dtype, take_array
from ._remote import Store, exists, is_url, read_file, where

__all__ = ["NpyDataset", "from_spec"]


class NpyDataset:
    """Rows of a memory-mapped ``.npy`` file, optionally with labels (Python scalars, as ``.item()``)."""

    def __init__(
        self, path: str | Path, labels: str | Path | None = None, store: Store | None = None
    ) -> None:
        self.path = where(path)
        self.labels_path = where(labels) if labels is not None else None
        remote = is_url(self.path) or (self.labels_path is not None and is_url(self.labels_path))
        self.store = (store or Store()) if remote else None
        self._open()

    def _open(self) -> None:
        self.data = read_file(self.path, _load, self.store)
        if self.data.ndim < 1:
            raise ValueError(f"{self.path}: a dataset array needs at least one dimension")
        self.labels = None
        if self.labels_path is not None:
            self.labels = read_file(self.labels_path, _load, self.store)
            if len(self.labels) != len(self.data):
                raise ValueError(
                    f"{self.labels_path} has {len(self.labels)} labels for {len(self.data)} samples"
                )

    # Pickle by path: a memmap would otherwise be pickled with all its data.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "labels_path": self.labels_path, "store": self.store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.labels_path = state["labels_path"]
        self.store = state["store"]
        self._open()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        x = torch.from_numpy(np.array(self.data[index]))
        if self.labels is None:
            return x
        return x, self.labels[index].item()

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        # One gather from the map instead of one page walk per sample.
        rows = torch.from_numpy(self.data[np.asarray(indices, dtype=np.int64)])
        if self.labels is None:
            return list(rows)
        labels = self.labels[np.asarray(indices, dtype=np.int64)].tolist()  # Python scalars, as .item()
        return list(zip(rows, labels, strict=True))

    def batch_gatherer(self) -> Gather | None:
        data, labels = self.data, self.labels
        if data.dtype.kind not in "biufc":
            return None
        if labels is None:
            return lambda idx, w: take_array(data, idx, w)
        label_dtype = collated_dtype(labels.dtype)
        return lambda idx, w: [take_array(data, idx, w), take_array(labels, idx, w, label_dtype)]


def _load(path: Path) -> Any:
    return np.load(path, mmap_mode="r")


def from_spec(rest: str) -> NpyDataset:
    path, opts = split_options(rest, {"labels"})
    if not exists(path):
        raise ValueError(f"no such file {path!r}")
    if "labels" in opts and not exists(opts["labels"]):
        raise ValueError(f"labels: no such file {opts['labels']!r}")
    return NpyDataset(path, opts.get("labels"))
