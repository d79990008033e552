"""The server's collate registry: collates are chosen by name, never sent as code.

Built in:

* ``default``: torch's ``default_collate`` semantics (same structure and dtypes),
  with every stacked tensor written straight into the batch's shared-memory slot;
* ``pad``: the same, but tensors of different shapes are padded to the largest
  size in each dimension with ``padding_value`` (0), for variable-length sequences;
* ``pack``: 1-D samples (token documents) packed into rows of ``seq_len`` (2048)
  tokens with their document boundaries (:func:`pack_collate`);
* ``convert``: torch's ``default_convert`` (numpy arrays to tensors, through any
  containers; nothing stacked, plain values kept). A stream without batching (torch's
  ``batch_size=None``, OpenStream.unbatched) gives it each sample by itself, as torch
  does; with batches it makes a list of converted samples, as torch's
  ``collate_fn=default_convert`` does.

Without batching every collate is called with one sample, not a list (as torch calls
its ``collate_fn`` with ``batch_size=None``); the loader asks for ``convert`` where
torch would use its default.

Register more with :func:`register_collate` before the server starts. A plain
function ``fn(samples) -> batch`` works as with torch; its output tensors are
copied into the slot once. A :class:`SlotCollate` (``fn(samples, writer)``) can
build its output in the slot directly with ``writer.alloc``.

A collate made by :func:`pad_collate` or :func:`pack_collate` carries a *recipe*
(:class:`PadRecipe`, :class:`PackRecipe`): what it builds, with its parameters,
so that a dataset can build exactly the same batch its own vectorised way instead
of sample by sample (its ``collate_gatherer(recipe)``, see :mod:`.fetch`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data._utils.collate import collate as _torch_collate
from torch.utils.data._utils.collate import default_collate_fn_map, default_convert

from batchferry import protocol
from batchferry.layout import SlotWriter

__all__ = [
    "DEFAULT_SEQ_LEN",
    "CollateFn",
    "PackRecipe",
    "PadRecipe",
    "Recipe",
    "SlotCollate",
    "collate_names",
    "get_collate",
    "pack_collate",
    "pack_rows",
    "pack_samples",
    "pad_collate",
    "register_collate",
]

CollateFn = Callable[[Sequence[Any]], Any]
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]

DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class PadRecipe:
    """What ``pad_collate(padding_value)`` builds."""

    padding_value: float = 0


@dataclass(frozen=True)
class PackRecipe:
    """What ``pack_collate(seq_len, padding_value)`` builds."""

    seq_len: int = DEFAULT_SEQ_LEN
    padding_value: int = 0


Recipe = PadRecipe | PackRecipe


@dataclass(frozen=True)
class SlotCollate:
    """A collate that writes its output tensors through a :class:`SlotWriter`.

    ``recipe``, when set, says what ``fn`` builds, so that a dataset offering a
    vectorised gather for it may build the batch instead (with the same result).
    """

    fn: Callable[[Sequence[Any], SlotWriter], Any]
    recipe: Recipe | None = None

    def __call__(self, samples: Sequence[Any], writer: SlotWriter) -> Any:
        return self.fn(samples, writer)


def _stack_into(batch: Sequence[torch.Tensor], *, writer: SlotWriter, **_: Any) -> torch.Tensor:
    elem = batch[0]
    if elem.layout != torch.strided or elem.is_nested:
        raise RuntimeError(f"cannot collate {elem.layout} tensors with 'default'; densify them first")
    out = writer.alloc((len(batch), *elem.shape), elem.dtype)
    return torch.stack(list(batch), 0, out=out)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    # force: a sample that requires grad is copied as its values, as torch's collate does.
    return t.numpy(force=True) if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy(force=True)


def _pad_into(
    batch: Sequence[torch.Tensor], *, writer: SlotWriter, padding_value: float, **_: Any
) -> torch.Tensor:
    elem = batch[0]
    if any(t.dim() != elem.dim() for t in batch):
        raise RuntimeError("pad collate needs tensors with the same number of dimensions")
    if all(t.shape == elem.shape for t in batch):
        return _stack_into(batch, writer=writer)
    longest = [max(t.shape[d] for t in batch) for d in range(elem.dim())]
    out = writer.alloc((len(batch), *longest), elem.dtype)
    out.fill_(padding_value)
    if elem.dim() == 1 and all(t.dtype == elem.dtype for t in batch):
        # Sequences (the common case): each copied once, straight into its row, by numpy
        # (a torch slice and copy per row costs several times more). numpy has no
        # bfloat16: that goes as 16-bit integers, bit for bit.
        for row, t in zip(_as_numpy(out), batch, strict=True):
            row[: t.shape[0]] = _as_numpy(t)
        return out
    for row, t in zip(out, batch, strict=True):
        row[tuple(slice(0, s) for s in t.shape)].copy_(t)
    return out


def _in_slot(tensor_fn: Callable[..., torch.Tensor], samples: Sequence[Any], writer: SlotWriter) -> Any:
    fn_map = dict(default_collate_fn_map)
    fn_map[torch.Tensor] = functools.partial(tensor_fn, writer=writer)
    return _torch_collate(samples, collate_fn_map=fn_map)


def _default(samples: Sequence[Any], writer: SlotWriter) -> Any:
    return _in_slot(_stack_into, samples, writer)


def pad_collate(padding_value: float = 0) -> SlotCollate:
    """A ``pad`` collate with another padding value, to register under a new name."""
    tensor_fn = functools.partial(_pad_into, padding_value=padding_value)
    return SlotCollate(functools.partial(_in_slot, tensor_fn), PadRecipe(padding_value))


def pack_rows(
    lengths: np.ndarray,
    dtype: torch.dtype,
    recipe: PackRecipe,
    alloc: Alloc,
    write_tokens: Callable[[torch.Tensor], object],
) -> dict[str, torch.Tensor]:
    """Documents of ``lengths`` tokens packed into rows of ``recipe.seq_len``.

    ``write_tokens(flat)`` writes the documents' tokens, concatenated in order,
    into ``flat`` (1-D, ``lengths.sum()`` long). Everything else is computed from
    the lengths with whole-array operations (no loop over documents):

    * ``input_ids`` ``[rows, seq_len]``: the tokens, cut into rows; the last row
      is filled up with ``padding_value``;
    * ``position_ids`` (int64): each token's position within its document's piece
      in this row; 0 where a document starts and at the start of every row (a
      document cut at a row's end continues in the next row from 0, since rows
      attend separately). The padding counts as one more piece;
    * ``doc_ids`` (int64): the document's index in the batch, -1 on padding.
    """
    seq_len = recipe.seq_len
    total = int(lengths.sum())
    rows = -(-total // seq_len)
    size = rows * seq_len
    input_ids = alloc((rows, seq_len), dtype)
    position_ids = alloc((rows, seq_len), torch.int64)
    doc_ids = alloc((rows, seq_len), torch.int64)
    flat = input_ids.view(-1)
    write_tokens(flat[:total])
    flat[total:].fill_(recipe.padding_value)
    pieces = np.append(lengths, size - total)  # the documents, then the padding
    starts = np.cumsum(pieces) - pieces
    position = position_ids.numpy().reshape(-1)
    index = np.arange(size, dtype=np.int64)
    np.subtract(index, np.repeat(starts, pieces), out=position)
    np.minimum(position, index % seq_len, out=position)
    doc = np.arange(len(pieces), dtype=np.int64)
    doc[-1] = -1
    doc_ids.numpy().reshape(-1)[:] = np.repeat(doc, pieces)
    return {"input_ids": input_ids, "position_ids": position_ids, "doc_ids": doc_ids}


def _pack(samples: Sequence[Any], alloc: Alloc, recipe: PackRecipe) -> dict[str, torch.Tensor]:
    if not samples:
        raise RuntimeError("pack collate got no samples")
    first = samples[0]
    for i, s in enumerate(samples):
        if not isinstance(s, torch.Tensor) or s.dim() != 1:
            raise RuntimeError(
                f"pack collate needs samples that are 1-D tensors; sample {i} is "
                + (f"a tensor of shape {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__)
            )
        if s.dtype != first.dtype:
            raise RuntimeError(f"pack collate needs one dtype; sample {i} is {s.dtype}, not {first.dtype}")
    lengths = np.array([s.numel() for s in samples], dtype=np.int64)
    return pack_rows(lengths, first.dtype, recipe, alloc, lambda flat: torch.cat(list(samples), out=flat))


def _pack_into(samples: Sequence[Any], writer: SlotWriter, *, recipe: PackRecipe) -> dict[str, torch.Tensor]:
    return _pack(samples, writer.alloc, recipe)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def pack_samples(
    samples: Sequence[torch.Tensor], seq_len: int = DEFAULT_SEQ_LEN, padding_value: int = 0
) -> dict[str, torch.Tensor]:
    """The ``pack`` collate as a plain function (e.g. a ``collate_fn`` for torch's DataLoader)."""
    return _pack(samples, _empty, _pack_recipe(seq_len, padding_value))


def _pack_recipe(seq_len: int, padding_value: int) -> PackRecipe:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(padding_value, bool) or not isinstance(padding_value, int):
        raise ValueError(f"padding_value must be an integer, got {padding_value!r}")
    return PackRecipe(seq_len, padding_value)


def pack_collate(seq_len: int = DEFAULT_SEQ_LEN, padding_value: int = 0) -> SlotCollate:
    """Pack a batch's 1-D samples into rows of ``seq_len`` tokens, keeping document boundaries.

    The batch is a dict ``{"input_ids", "position_ids", "doc_ids"}``, each
    ``[rows, seq_len]`` with ``rows = ceil(total tokens / seq_len)`` (see
    :func:`pack_rows`). ``pack`` is ``pack_collate(2048)``; register others under
    names of their own::

        Server({"text": ds}, collates={"pack8k": pack_collate(8192)})
    """
    recipe = _pack_recipe(seq_len, padding_value)
    return SlotCollate(functools.partial(_pack_into, recipe=recipe), recipe)


DEFAULT = SlotCollate(_default)

_REGISTRY: dict[str, SlotCollate | CollateFn] = {
    protocol.CONVERT_COLLATE: default_convert,
    "default": DEFAULT,
    "pack": pack_collate(),
    "pad": pad_collate(0),
}


def register_collate(name: str, fn: SlotCollate | CollateFn) -> None:
    """Make ``fn`` available to clients as ``collate_fn=name``.

    Register at import time of the module that defines ``fn`` (worker processes
    import it too), before the server starts. Names are unique.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"collate name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"collate {name!r} is already registered")
    if not callable(fn):
        raise TypeError(f"collate {name!r} must be callable")
    _REGISTRY[name] = fn


def collate_names() -> list[str]:
    return sorted(_REGISTRY)


def get_collate(name: str) -> SlotCollate | CollateFn:
    """The registered collate; ``KeyError`` naming the choices otherwise."""
    try:
        return _REGISTRY[name or "default"]
    except KeyError:
        raise KeyError(f"unknown collate {name!r}; registered: {', '.join(collate_names())}") from None


def run_collate(fn: SlotCollate | CollateFn, samples: Any, writer: SlotWriter) -> Any:
    """``fn`` on ``samples``: a list of samples, or without batching one sample by itself."""
    if isinstance(fn, SlotCollate):
        return fn(samples, writer)
    return fn(samples)
