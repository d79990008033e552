"""A frame's batches as the loader takes them: decoded from the frame's header over its
payload (a frame may carry several small batches), or, for a batch the server's
dataset failed to build, the exception the loop gets in its place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from batchferry import layout as _layout
from batchferry.errors import DatasetError, dataset_error
from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["Batch", "decode", "failed"]


@dataclass
class Batch:
    index: int
    data: Any
    event: Any = None  # CUDA event the consumer's stream must wait on
    nbytes: int = 0  # the batch's payload bytes (the loader's stats count them)
    # The first batch of its frame (a frame may carry several small batches: one slot,
    # one credit, one release), and whether this one ends it.
    frame: int = 0
    last: bool = True
    # The dataset failed to build it: raise this in its place (``data`` is None).
    error: DatasetError | None = None
    # An IterableDataset's batch: the iterator that made it, its dataset's state after it.
    iterator: int = 0
    iterator_state: bytes = b""


def decode(header: _pb2.BatchHeader, payload: torch.Tensor) -> list[Batch]:
    """The batches of a frame, as views of its payload (with ``more``, several in order)."""
    parts = [(header.index, header.layout), *((part.index, part.layout) for part in header.more)]
    batches = []
    end = 0
    for index, layout in parts:
        nbytes = max(0, layout.payload_bytes - end)
        end = max(end, layout.payload_bytes)
        batches.append(
            Batch(index, _layout.decode(layout, payload), nbytes=nbytes, frame=header.index, last=False)
        )
    batches[-1].last = True
    batches[0].iterator, batches[0].iterator_state = header.iterator, header.iterator_state
    return batches


def failed(header: _pb2.BatchHeader, where: str) -> Batch:
    """An error frame: the batch, as the exception the loop gets in its place (``where``:
    the server, dataset and batch, as the message names them)."""
    if header.slot or header.num_chunks or header.more or header.HasField("layout"):
        raise ValueError(f"batch {header.index}: an error frame carries no layout, payload or slot")
    error = header.error
    exc = dataset_error(error.type, error.message, error.traceback, where)
    return Batch(header.index, None, frame=header.index, error=exc, iterator=header.iterator)
