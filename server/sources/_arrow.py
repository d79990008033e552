"""Arrow columns as sample fields, and their vectorised gather (Parquet and Hugging Face sources).

Per column type:

* integers, floats, booleans (no nulls): a 0-d tensor per sample, the column's dtype;
* fixed-size lists of those, nested or not: a tensor of the list's shape;
* strings: ``str``; binary: a uint8 tensor of the bytes;
* variable-length lists of numbers: a 1-D tensor (use the ``pad`` collate);
* images (a Hugging Face ``Image`` feature): a uint8 CHW tensor, decoded with Pillow;
* anything else: the Python value (``as_py``).

When every selected column is of the first three kinds, a batch is one take per
column: numpy straight into the slot where the column is one contiguous chunk,
otherwise Arrow's take (which reads only the rows taken from a memory map) and
one copy into the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchferry.layout import SlotWriter

from ._common import require
from ._gather import take_array, torch_dtype
from ._images import ImageDecode

__all__ = ["Column", "bind", "can_gather", "column_kinds", "gather_columns", "sample_fields"]

_VECTOR = ("number", "fixed", "string")


def _pa() -> Any:
    return require("pyarrow", "parquet", "reading Arrow and Parquet data")


def _fixed_shape(pa: Any, typ: Any) -> tuple[tuple[int, ...], Any] | None:
    """(shape, value type) of nested fixed-size lists of numbers."""
    shape: list[int] = []
    while pa.types.is_fixed_size_list(typ):
        shape.append(typ.list_size)
        typ = typ.value_type
    if shape and _is_number(pa, typ):
        return tuple(shape), typ
    return None


def _is_number(pa: Any, typ: Any) -> bool:
    return bool(pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ))


@dataclass
class Column:
    """One selected column: its kind and, for numbers, the numpy dtype and per-sample shape."""

    name: str
    kind: str  # number | fixed | string | binary | list | image | object
    dtype: np.dtype[Any] | None = None
    shape: tuple[int, ...] = ()
    data: Any = None  # pyarrow ChunkedArray
    flat: np.ndarray | None = None  # (rows, *shape) view, when one chunk without nulls


def column_kinds(schema: Any, names: Sequence[str], images: Sequence[str] = ()) -> list[Column]:
    """Classify ``names`` of an Arrow ``schema``; ``images`` are columns to decode as images."""
    pa = _pa()
    out = []
    for name in names:
        typ = schema.field(name).type
        if name in images:
            out.append(Column(name, "image"))
        elif _is_number(pa, typ):
            out.append(Column(name, "number", np.dtype(typ.to_pandas_dtype())))
        elif (fixed := _fixed_shape(pa, typ)) is not None:
            out.append(Column(name, "fixed", np.dtype(fixed[1].to_pandas_dtype()), fixed[0]))
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
            out.append(Column(name, "string"))
        elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ):
            out.append(Column(name, "binary"))
        elif (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and _is_number(pa, typ.value_type):
            out.append(Column(name, "list", np.dtype(typ.value_type.to_pandas_dtype())))
        else:
            out.append(Column(name, "object"))
    for col in out:
        if col.dtype is not None:
            torch_dtype(col.dtype)  # raises TypeError for dtypes torch lacks
    return out


def _to_numpy(pa: Any, array: Any, col: Column) -> np.ndarray:
    """A contiguous (rows, *shape) array of one Arrow array."""
    values = array
    for _ in col.shape:
        values = values.flatten()
    flat: np.ndarray = values.to_numpy(zero_copy_only=False)
    return flat.reshape(len(array), *col.shape)


def bind(columns: list[Column], table: Any, where: Callable[[str], str]) -> None:
    """Attach ``table``'s data to ``columns``; numbers must have no nulls (``where`` names the file)."""
    pa = _pa()
    for col in columns:
        data = table.column(col.name)
        col.data = data
        if col.kind not in ("number", "fixed"):
            continue
        if data.null_count:
            raise ValueError(f"{where(col.name)}: column {col.name!r} has {data.null_count} null(s)")
        if data.num_chunks == 1 and not pa.types.is_boolean(col.data.type):
            col.flat = _to_numpy(pa, data.chunk(0), col)


def sample_fields(columns: list[Column], row: int, decoder: ImageDecode) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in columns:
        if col.flat is not None:
            out[col.name] = torch.from_numpy(np.array(col.flat[row]))
            continue
        scalar = col.data[row]
        if col.kind in ("number", "fixed"):
            out[col.name] = torch.from_numpy(np.array(scalar.as_py(), dtype=col.dtype).reshape(col.shape))
        elif col.kind == "binary":
            raw = scalar.as_py()
            out[col.name] = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                if raw
                else torch.empty(0, dtype=torch.uint8)
            )
        elif col.kind == "list":
            out[col.name] = torch.from_numpy(np.array(scalar.as_py(), dtype=col.dtype))
        elif col.kind == "image":
            value = scalar.as_py()
            if isinstance(value, dict):  # Hugging Face Image: {"bytes": ..., "path": ...}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str):
                value = Path(value)
            out[col.name] = decoder.decode(value)
        else:
            out[col.name] = scalar.as_py()
    return out


def can_gather(kinds: Iterable[str]) -> bool:
    """Whether columns of these kinds allow the one-take-per-column gather."""
    return all(kind in _VECTOR for kind in kinds)


def _rows(pa: Any, col: Column, idx: np.ndarray) -> Any:
    """The rows ``idx`` of one column: a numpy array, or a list for strings."""
    if col.flat is not None:
        return col.flat[idx]
    taken = col.data.take(pa.array(idx))
    if col.kind == "string":
        return taken.to_pylist()
    return _to_numpy(pa, taken.combine_chunks(), col)


def gather_columns(
    parts: list[tuple[list[Column], np.ndarray, np.ndarray]], size: int, writer: SlotWriter
) -> dict[str, Any]:
    """default_collate of ``size`` rows' fields, one take per column and part.

    ``parts`` are (columns of one file, row indices into it, positions in the batch).
    """
    pa = _pa()
    out: dict[str, Any] = {}
    for c, first in enumerate(parts[0][0]):
        if len(parts) == 1 and first.flat is not None:
            out[first.name] = take_array(first.flat, parts[0][1], writer)  # straight into the slot
            continue
        if first.kind == "string":
            values: list[Any] = [None] * size
            for columns, rows, positions in parts:
                for p, v in zip(positions.tolist(), _rows(pa, columns[c], rows), strict=True):
                    values[p] = v
            out[first.name] = values
            continue
        assert first.dtype is not None
        dest = writer.alloc((size, *first.shape), torch_dtype(first.dtype))
        for columns, rows, positions in parts:
            dest.numpy()[positions] = _rows(pa, columns[c], rows)
        out[first.name] = dest
    return out
