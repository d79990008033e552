"""Vectorised batch builders: one take per field, straight into the slot.

A source offers ``batch_gatherer()`` returning a :data:`Gather` (or None when its
samples do not allow one). ``gather(indices, writer)`` must give exactly what
``default_collate([ds[i] for i in indices])`` gives, with its tensors allocated
through ``writer`` so that they already lie in the batch's slot.

A source may also offer ``collate_gatherer(recipe)``: a gather equal to the
collate a :class:`~batchferry.server.collate.PadRecipe` or
:class:`~batchferry.server.collate.PackRecipe` describes (``pad``, ``pack``), or None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchferry.layout import SlotWriter

__all__ = ["Gather", "collated_dtype", "take_array", "take_tensor", "torch_dtype"]

Gather = Callable[[np.ndarray, SlotWriter], Any]


def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def take_tensor(t: torch.Tensor, idx: np.ndarray, writer: SlotWriter) -> torch.Tensor:
    out = writer.alloc((len(idx), *t.shape[1:]), t.dtype)
    return torch.index_select(t, 0, torch.from_numpy(idx), out=out)


def take_array(
    a: np.ndarray, idx: np.ndarray, writer: SlotWriter, dtype: np.dtype[Any] | None = None
) -> torch.Tensor:
    """``a[idx]`` (rows) as a tensor of ``dtype`` (default ``a``'s) allocated in the slot."""
    dtype = a.dtype if dtype is None else dtype
    out = writer.alloc((len(idx), *a.shape[1:]), torch_dtype(dtype))
    if a.dtype == dtype and a.flags.c_contiguous:
        # mode="clip": with the default "raise", numpy stages `out` in a temporary.
        np.take(a, idx, axis=0, out=out.numpy(), mode="clip")
    else:
        out.numpy()[...] = a[idx]
    return out


def collated_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype default_collate gives a batch of Python scalars read from ``dtype``."""
    kind = dtype.kind
    if kind == "b":
        return np.dtype(np.bool_)
    if kind in "iu":
        return np.dtype(np.int64)
    return np.dtype(np.float64)
