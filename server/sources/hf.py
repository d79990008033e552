"""``hf:PATH[,split=NAME][,columns=a,b,...][,resize=..][,crop=..][,mode=RGB]``: a saved Hugging Face dataset.

A dataset written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``),

loaded with ``datasets.load_from_disk`` (Arrow files, memory-mapped: every process
maps the same pages). A ``DatasetDict`` needs ``split`` unless it has one split.
Samples are dicts ``{column: value}`` as :mod:`._arrow` describes; ``Image``
feature columns decode with Pillow (``resize``, ``crop``, ``mode`` as for
``imagefolder:``). Numbers, fixed-size sequences and strings are gathered with one
take per column straight from the memory map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batchferry.layout import SlotWriter

from . import _arrow
from ._common import SampleError, require, split_options
from ._gather import Gather
from ._images import ImageDecode, pillow

__all__ = ["HFDataset", "from_spec"]


def _datasets() -> Any:
    return require("datasets", "hf", "the hf: source")


def _load(path: Path, split: str | None) -> Any:
    hf = _datasets()
    try:
        loaded = hf.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: not a dataset saved with save_to_disk: {exc}") from exc
    if isinstance(loaded, hf.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{path} holds splits {', '.join(loaded)}; choose one with split=")
        loaded = loaded[split]
    elif split is not None:
        raise ValueError(f"{path} is a single dataset; it has no split {split!r}")
    return loaded


class HFDataset:
    """Rows of a saved Hugging Face ``Dataset`` as dicts of tensors and strings.

    Examples:
        >>> ds = HFDataset("/data/mnist_hf", split="train", columns=["image", "label"])  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str | None = None,
        columns: Sequence[str] | None = None,
        decoder: ImageDecode | None = None,
    ) -> None:
        self.path, self.split = Path(path), split
        if not self.path.is_dir():
            raise ValueError(f"no such directory {str(path)!r}")
        ds = _load(self.path, split)
        names = list(columns) if columns else list(ds.column_names)
        missing = [c for c in names if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"no column(s) {', '.join(map(repr, missing))}; it has {', '.join(ds.column_names)}"
            )
        self.columns = names
        self.decoder = decoder or ImageDecode()
        hf = _datasets()
        self._images = [c for c in names if isinstance(ds.features[c], hf.Image)]
        if self._images:
            pillow()
        self._len = len(ds)
        self._kinds = [c.kind for c in _arrow.column_kinds(ds.data.schema, names, self._images)]
        self._indexed = getattr(ds, "_indices", None) is not None
        self._ds: Any = ds
        self._columns: list[_arrow.Column] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.path, self.split, self.columns, self.decoder))

    def __len__(self) -> int:
        return self._len

    def _open(self, index: int) -> list[_arrow.Column]:
        if self._columns is None:
            if self._ds is None:
                self._ds = _load(self.path, self.split)
            ds = self._ds
            table = ds.data.table  # pyarrow.Table over the memory-mapped files
            columns = _arrow.column_kinds(table.schema, self.columns, self._images)
            try:
                _arrow.bind(columns, table, lambda name: str(self.path))
            except OSError as exc:
                raise SampleError(index, self.path.name, f"cannot read: {exc}") from exc
            self._columns = columns
        return self._columns

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"sample {index} out of range for {self._len} samples")
        if self._indexed:  # rows selected by an indices mapping: let the library resolve them
            row = self._ds[index]
            return {c: row[c] for c in self.columns}
        try:
            return _arrow.sample_fields(self._open(index), index, self.decoder)
        except OSError as exc:
            raise SampleError(index, f"column of {self.path.name}", f"cannot decode: {exc}") from exc

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def batch_gatherer(self) -> Gather | None:
        if self._indexed or not _arrow.can_gather(self._kinds):
            return None

        def gather(idx: np.ndarray, writer: SlotWriter) -> dict[str, Any]:
            columns = self._open(int(idx[0]) if len(idx) else 0)
            return _arrow.gather_columns([(columns, idx, np.arange(len(idx)))], len(idx), writer)

        return gather


def _rebuild(path: Path, split: str | None, columns: list[str], decoder: ImageDecode) -> HFDataset:
    return HFDataset(path, split=split, columns=columns, decoder=decoder)


def from_spec(rest: str) -> HFDataset:
    path, opts = split_options(rest, {"split", "columns", "resize", "crop", "mode"})
    columns = [c.strip() for c in opts["columns"].split(",") if c.strip()] if "columns" in opts else None
    return HFDataset(path, split=opts.get("split"), columns=columns, decoder=ImageDecode.from_options(opts))
