"""Fetch one batch's samples and collate them into a slot, vectorised where possible.

With the ``default`` collate, datasets whose storage allows it are gathered with
one take per field straight into the slot, with exactly the result
``default_collate`` would give:

* ``torch.utils.data.TensorDataset`` (samples are tuples, batches lists of tensors);
* any dataset whose ``batch_gatherer()`` returns a builder (the ``.npy``, synthetic,
  MNIST, Parquet and Hugging Face sources, and image folders with a fixed size);
  not when a subclass redefines what a sample is (``__getitem__``/``__getitems__``).

A collate that carries a recipe (``pad``, ``pack``, and any made by
``pad_collate``/``pack_collate``) is built by the dataset's
``collate_gatherer(recipe)`` when that returns a builder (the token source does,
see :mod:`.sources.tokens`): it must give exactly what the collate gives from the
dataset's samples. Same subclass rule.

Everything else goes through ``__getitems__`` when the dataset has it, else one
``__getitem__`` per sample, then the collate.

Without batching (``unbatched``, torch's ``batch_size=None``) a batch is one sample,
read with ``__getitem__`` and given to the collate by itself, as torch does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from batchferry.layout import SlotWriter

from .collate import DEFAULT, CollateFn, Recipe, SlotCollate, run_collate
from .datasets import MapDataset
from .sources._gather import Gather, take_tensor

__all__ = ["Gather", "build_batch", "collate_gatherer", "gatherer"]


def _own_gatherer(ds: MapDataset, hook: str, *args: Any) -> Gather | None:
    cls = type(ds)
    owner = next((c for c in cls.__mro__ if hook in vars(c)), None)
    if owner is None:
        return None
    for name in ("__getitem__", "__getitems__"):
        if getattr(cls, name, None) is not getattr(owner, name, None):
            return None  # a subclass changed the samples the gather reproduces
    make: Callable[..., Gather | None] | None = getattr(ds, hook, None)
    return make(*args) if make is not None else None


def gatherer(ds: MapDataset) -> Gather | None:
    """A one-gather-per-field builder equal to default_collate for ``ds``, if there is one."""
    if type(ds) is TensorDataset and all(t.device.type == "cpu" for t in ds.tensors):
        tensors = ds.tensors
        return lambda idx, w: [take_tensor(t, idx, w) for t in tensors]
    return _own_gatherer(ds, "batch_gatherer")


# (id(dataset), recipe) -> (dataset, its gather): the dataset is held, so its id stays its own.
_RECIPE_GATHERS: dict[tuple[int, Recipe], tuple[MapDataset, Gather | None]] = {}


def collate_gatherer(ds: MapDataset, recipe: Recipe) -> Gather | None:
    """``ds``'s vectorised builder of what ``recipe``'s collate builds, if it offers one (cached)."""
    key = (id(ds), recipe)
    cached = _RECIPE_GATHERS.get(key)
    if cached is None or cached[0] is not ds:
        cached = _RECIPE_GATHERS[key] = (ds, _own_gatherer(ds, "collate_gatherer", recipe))
    return cached[1]


def build_batch(
    ds: MapDataset,
    gather: Gather | None,
    indices: np.ndarray,
    collate: SlotCollate | CollateFn,
    writer: SlotWriter,
    *,
    unbatched: bool = False,
) -> tuple[Any, bool]:
    """The batch, and whether it was gathered vectorised."""
    if unbatched:
        if len(indices) != 1:  # the plan and the client's lists are checked for it
            raise ValueError(f"a stream without batching builds one sample at a time, not {len(indices)}")
        return run_collate(collate, ds[int(indices[0])], writer), False
    # Equality, not identity: worker processes receive the registry by pickle.
    if gather is not None and collate == DEFAULT:
        return gather(indices, writer), True
    recipe = collate.recipe if isinstance(collate, SlotCollate) else None
    if recipe is not None:
        vectorised = collate_gatherer(ds, recipe)
        if vectorised is not None:
            return vectorised(indices, writer), True
    as_list = indices.tolist()
    getitems = getattr(ds, "__getitems__", None)
    samples = getitems(as_list) if getitems is not None else [ds[i] for i in as_list]
    return run_collate(collate, samples, writer), False
