"""The server's collate registry: collates are chosen by name, never sent as code.

Built in:

* ``default``: torch's ``default_collate`` semantics (same structure and dtypes),
  with every stacked tensor written straight into the batch's shared-memory slot;
* ``pad``: the same, but tensors of different shapes are padded to the largest
  size in each dimension with ``padding_value`` (0), for variable-length sequences.

Register more with :func:`register_collate` before the server starts. A plain
function ``fn(samples) -> batch`` works as with torch; its output tensors are
copied into the slot once. A :class:`SlotCollate` (``fn(samples, writer)``) can
build its output in the slot directly with ``writer.alloc``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data._utils.collate import collate as _torch_collate
from torch.utils.data._utils.collate import default_collate_fn_map

from batchferry.layout import SlotWriter

__all__ = [
    "CollateFn",
    "SlotCollate",
    "collate_names",
    "get_collate",
    "pad_collate",
    "register_collate",
]

CollateFn = Callable[[Sequence[Any]], Any]


@dataclass(frozen=True)
class SlotCollate:
    """A collate that writes its output tensors through a :class:`SlotWriter`."""

    fn: Callable[[Sequence[Any], SlotWriter], Any]

    def __call__(self, samples: Sequence[Any], writer: SlotWriter) -> Any:
        return self.fn(samples, writer)


def _stack_into(batch: Sequence[torch.Tensor], *, writer: SlotWriter, **_: Any) -> torch.Tensor:
    elem = batch[0]
    if elem.layout != torch.strided or elem.is_nested:
        raise RuntimeError(f"cannot collate {elem.layout} tensors with 'default'; densify them first")
    out = writer.alloc((len(batch), *elem.shape), elem.dtype)
    return torch.stack(list(batch), 0, out=out)


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
    return SlotCollate(functools.partial(_in_slot, tensor_fn))


DEFAULT = SlotCollate(_default)

_REGISTRY: dict[str, SlotCollate | CollateFn] = {
    "default": DEFAULT,
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


def run_collate(fn: SlotCollate | CollateFn, samples: Sequence[Any], writer: SlotWriter) -> Any:
    if isinstance(fn, SlotCollate):
        return fn(samples, writer)
    return fn(samples)
