"""``loader.dataset``: a handle on the served dataset, for code that reads it as torch's.

Frameworks and scripts read ``len(loader.dataset)`` to plan steps and schedules,
``isinstance(loader.dataset, Dataset)``, and now and then a sample (``dataset[0]`` to
look at its shape). The handle answers from the server: its length and sample
structure from the dataset listing, a sample from a small unary call that a server
worker builds (converted as torch's ``default_convert`` does: numpy arrays become
tensors), with the limits every request has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["RemoteDataset"]


class RemoteDataset(Dataset[Any]):
    """The dataset ``name`` as its loader's servers serve it."""

    def __init__(self, name: str, connection: Connection) -> None:
        self.name = name
        self._connection = connection

    def __len__(self) -> int:
        info = self._connection.dataset_info()
        if info.iterable and not info.sized:
            raise TypeError(f"dataset {self.name!r} is an IterableDataset without __len__")
        return self._connection.dataset_length

    @property
    def iterable(self) -> bool:
        """Whether the served dataset is an IterableDataset (docs/iterable.md)."""
        return bool(self._connection.dataset_info().iterable)

    @property
    def sample_structure(self) -> str:
        """One sample's structure as the server describes it, e.g. ``(Tensor[float32, 3], int)``."""
        return self._connection.dataset_info().sample_structure

    def __getitem__(self, index: int) -> Any:
        """Sample ``index`` (negative counts from the end), fetched from the server;
        IndexError out of range, as for a list (so iterating the handle stops at the end)."""
        if self._connection.dataset_info().iterable:
            raise NotImplementedError(
                f"dataset {self.name!r} is an IterableDataset: it has no samples by index, as in torch"
            )
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"dataset indices must be integers, got {type(index).__name__}")
        index = index.__index__()
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for dataset {self.name!r} of {length} samples")
        return self._connection.sample(index % length)

    def __repr__(self) -> str:
        return f"RemoteDataset({self.name!r}, {self._connection.config.address!r})"
