"""Fetch one batch's samples and collate them into a slot, vectorised where possible.

With the ``default`` collate, datasets whose storage is whole arrays are gathered
with one ``index_select``/``take`` per field straight into the slot, with exactly
the result ``default_collate`` would give:

* ``torch.utils.data.TensorDataset`` (samples are tuples, batches lists of tensors);
* :class:`~batchferry.server.datasets.NpyDataset` (memory-mapped rows, optional labels);
* :class:`~batchferry.server.datasets.SyntheticDataset`.

Everything else goes through ``__getitems__`` when the dataset has it, else one
``__getitem__`` per sample, then the collate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from batchferry.layout import SlotWriter

from .collate import DEFAULT, CollateFn, SlotCollate, run_collate
from .datasets import MapDataset, NpyDataset, SyntheticDataset

__all__ = ["build_batch", "gatherer"]

Gather = Callable[[np.ndarray, SlotWriter], Any]


def _take_tensor(t: torch.Tensor, idx: np.ndarray, writer: SlotWriter) -> torch.Tensor:
    out = writer.alloc((len(idx), *t.shape[1:]), t.dtype)
    return torch.index_select(t, 0, torch.from_numpy(idx), out=out)


def _take_array(a: np.ndarray, idx: np.ndarray, writer: SlotWriter, dtype: np.dtype[Any]) -> torch.Tensor:
    out = writer.alloc((len(idx), *a.shape[1:]), torch.from_numpy(np.empty(0, dtype)).dtype)
    if a.dtype == dtype:
        # mode="clip": with the default "raise", numpy stages `out` in a temporary.
        np.take(a, idx, axis=0, out=out.numpy(), mode="clip")
    else:
        out.numpy()[...] = a[idx]
    return out


def _label_dtype(labels: np.ndarray) -> np.dtype[Any]:
    """The dtype default_collate gives the Python scalars NpyDataset returns."""
    kind = labels.dtype.kind
    if kind == "b":
        return np.dtype(np.bool_)
    if kind in "iu":
        return np.dtype(np.int64)
    return np.dtype(np.float64)


def gatherer(ds: MapDataset) -> Gather | None:
    """A one-gather-per-field builder equal to default_collate for ``ds``, if there is one."""
    if type(ds) is TensorDataset and all(t.device.type == "cpu" for t in ds.tensors):
        tensors = ds.tensors
        return lambda idx, w: [_take_tensor(t, idx, w) for t in tensors]
    if type(ds) is SyntheticDataset:
        return lambda idx, w: [_take_tensor(ds.data, idx, w), _take_tensor(ds.targets, idx, w)]
    if type(ds) is NpyDataset and ds.data.dtype.kind in "biufc":
        data, labels = ds.data, ds.labels
        if labels is None:
            return lambda idx, w: _take_array(data, idx, w, data.dtype)
        label_dtype = _label_dtype(labels)
        return lambda idx, w: [
            _take_array(data, idx, w, data.dtype),
            _take_array(labels, idx, w, label_dtype),
        ]
    return None


def build_batch(
    ds: MapDataset,
    gather: Gather | None,
    indices: np.ndarray,
    collate: SlotCollate | CollateFn,
    writer: SlotWriter,
) -> tuple[Any, bool]:
    """The batch, and whether it was gathered vectorised."""
    # Equality, not identity: worker processes receive the registry by pickle.
    if gather is not None and collate == DEFAULT:
        return gather(indices, writer), True
    as_list = indices.tolist()
    getitems = getattr(ds, "__getitems__", None)
    samples = getitems(as_list) if getitems is not None else [ds[i] for i in as_list]
    return run_collate(collate, samples, writer), False
