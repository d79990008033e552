"""``tokens:PATH[,offsets=PATH,dtype=int32,lengths=false]``: documents of token ids.

The layout LLM pre-training data uses: one flat array of token ids, memory-mapped
(a ``.npy`` file, or a raw file of ``dtype`` such as a ``.bin``), and an offsets
array of ``n + 1`` entries (a ``.npy`` file of any integer dtype, or raw int64;
default ``offsets.npy`` beside the token file): document ``i`` is
``tokens[offsets[i]:offsets[i + 1]]``.

A sample is a 1-D tensor of the file's dtype, a document; with ``lengths=true`` it
is ``(tokens, length)``, so that ``pad`` batches also carry each row's length
(``[padded, lengths]``). Batches with the ``pad`` and ``pack`` collates (and any
made by ``pad_collate``/``pack_collate``) are built straight into the slot from the
offsets: one slice copy per document from the memory map into its place (a row, or
the packed sequence). Contiguous slice copies beat one fancy-indexed take of every
token: for W4's batches of 64 documents (16..512 tokens), 55 against 97 us. They are
copies between byte memoryviews, which cost less per document than numpy's slicing and
item assignment (a W4 ``pad`` batch in 60 instead of 71 us).

Either file may be a URL of object storage (see :mod:`._remote`): it is fetched into
the cache whole, then mapped from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchferry.layout import SlotWriter
from batchferry.server.collate import PackRecipe, PadRecipe, Recipe, pack_rows

from ._common import parse_bool, split_options
from ._gather import Gather, torch_dtype
from ._remote import Store, exists, is_url, read_file, sibling, where

__all__ = ["TOKEN_DTYPES", "TokenDataset", "from_spec"]

TOKEN_DTYPES = ("uint8", "int16", "uint16", "int32", "uint32", "int64")


def _open_tokens(path: Path, dtype: str | None) -> np.ndarray:
    tokens: np.ndarray
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if dtype is not None and tokens.dtype != np.dtype(dtype):
            raise ValueError(f"{path} holds {tokens.dtype}, not dtype={dtype}")
    else:
        if dtype is None:
            raise ValueError(f"{path} is a raw token file: say its dtype= ({', '.join(TOKEN_DTYPES)})")
        itemsize = np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
        tokens = np.memmap(path, dtype, mode="r") if size else np.empty(0, dtype)
    if tokens.ndim != 1 or tokens.dtype.name not in TOKEN_DTYPES:
        raise ValueError(
            f"{path}: tokens must be a 1-D array of {', '.join(TOKEN_DTYPES)}, "
            f"got {tokens.dtype} of shape {tokens.shape}"
        )
    return tokens


def _open_offsets(path: Path, n_tokens: int) -> np.ndarray:
    offsets = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, np.int64, mode="r")
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1:
        raise ValueError(
            f"{path}: offsets must be a 1-D integer array of n + 1 entries, "
            f"got {offsets.dtype} of shape {offsets.shape}"
        )
    if offsets.dtype == np.uint64 and offsets[-1] > np.iinfo(np.int64).max:
        raise ValueError(f"{path}: offsets beyond int64")
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[0] < 0 or np.any(offsets[1:] < offsets[:-1]) or offsets[-1] > n_tokens:
        raise ValueError(
            f"{path}: offsets must rise from >= 0 to at most the {n_tokens} tokens, "
            f"got {offsets[0]}..{offsets[-1]}"
        )
    return offsets


class TokenDataset:
    """Documents of a flat, memory-mapped token array cut by an offsets array.

    ``TokenDataset("tokens.npy")`` reads ``offsets.npy`` beside it; a raw file needs
    ``dtype``. ``lengths=True`` makes samples ``(tokens, length)``.
    """

    def __init__(
        self,
        tokens: str | Path,
        offsets: str | Path | None = None,
        dtype: str | None = None,
        lengths: bool = False,
        store: Store | None = None,
    ) -> None:
        self.tokens_path = where(tokens)
        self.offsets_path = (
            where(offsets) if offsets is not None else sibling(self.tokens_path, "offsets.npy")
        )
        self.dtype_name = dtype
        self.lengths = lengths
        remote = is_url(self.tokens_path) or is_url(self.offsets_path)
        self.store = (store or Store()) if remote else None
        self._open()

    def _open(self) -> None:
        # A plain ndarray over the map: numpy wraps every result of a memmap's methods.
        self.tokens = np.asarray(read_file(self.tokens_path, self._tokens_at, self.store))
        n_tokens = len(self.tokens)
        self.offsets = read_file(self.offsets_path, lambda p: _open_offsets(p, n_tokens), self.store)
        self.dtype = torch_dtype(self.tokens.dtype)
        self._token_bytes = _bytes_of(self.tokens)

    def _tokens_at(self, path: Path) -> np.ndarray:
        return _open_tokens(path, self.dtype_name)

    # Pickle by path: a memmap would otherwise be pickled with all its data.
    def __reduce__(self) -> tuple[Any, ...]:
        return (
            TokenDataset,
            (self.tokens_path, self.offsets_path, self.dtype_name, self.lengths, self.store),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"document {index} out of range for {n} documents")
        index %= n
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        doc = torch.from_numpy(np.array(self.tokens[start:stop]))
        return (doc, stop - start) if self.lengths else doc

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        # One copy of the batch's documents, then views of it.
        starts, lens = self._spans(np.asarray(indices, dtype=np.int64))
        flat = torch.from_numpy(self._concat(starts, lens, np.empty(int(lens.sum()), self.tokens.dtype)))
        docs = list(torch.split(flat, lens.tolist()))
        return list(zip(docs, lens.tolist(), strict=True)) if self.lengths else docs

    def _spans(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each document starts in ``tokens``, and its length."""
        n = len(self)
        if len(idx) and idx.min() < 0:  # samplers never ask for these; Python's meaning
            if idx.min() < -n:
                raise IndexError(f"document index out of range for {n} documents")
            idx = idx % n
        try:
            ends = self.offsets[idx + 1]  # offsets has n + 1 entries: this catches idx >= n
        except IndexError:
            raise IndexError(f"document index out of range for {n} documents") from None
        starts = self.offsets[idx]
        return starts, ends - starts

    def _concat(self, starts: np.ndarray, lens: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The documents' tokens one after another in ``out``."""
        src, dst, size, at = self._token_bytes, _bytes_of(out), self.tokens.itemsize, 0
        for start, n in zip(starts.tolist(), lens.tolist(), strict=True):
            dst[at : at + n * size] = src[start * size : (start + n) * size]
            at += n * size
        return out

    def _with_lengths(self, batch: torch.Tensor, lens: np.ndarray, writer: SlotWriter) -> Any:
        if not self.lengths:
            return batch
        lengths = writer.alloc((len(lens),), torch.int64)
        lengths.numpy()[:] = lens
        return [batch, lengths]

    def _pad(self, idx: np.ndarray, writer: SlotWriter, padding_value: float) -> Any:
        starts, lens = self._spans(idx)
        sizes = lens.tolist()  # Python's min and max: numpy's cost microseconds a call here
        longest = max(sizes, default=0)
        out = writer.alloc((len(idx), longest), self.dtype)
        if sizes and min(sizes) < longest:
            out.fill_(padding_value)
        src, dst, size = self._token_bytes, _bytes_of(out.numpy()), self.tokens.itemsize
        at, row = 0, longest * size
        for start, n in zip(starts.tolist(), sizes, strict=True):
            dst[at : at + n * size] = src[start * size : (start + n) * size]
            at += row
        return self._with_lengths(out, lens, writer)

    def _stack(self, idx: np.ndarray, writer: SlotWriter) -> Any:
        _, lens = self._spans(idx)
        if len(lens) and np.any(lens != lens[0]):
            raise RuntimeError(
                f"the default collate stacks documents of one length; this batch has lengths "
                f"{int(lens.min())}..{int(lens.max())}: use collate_fn='pad' or 'pack'"
            )
        return self._pad(idx, writer, 0)

    def _pack(self, idx: np.ndarray, writer: SlotWriter, recipe: PackRecipe) -> Any:
        starts, lens = self._spans(idx)
        return pack_rows(
            lens, self.dtype, recipe, writer.alloc, lambda flat: self._concat(starts, lens, flat.numpy())
        )

    def batch_gatherer(self) -> Gather:
        return self._stack

    def collate_gatherer(self, recipe: Recipe) -> Gather | None:
        if isinstance(recipe, PadRecipe):
            value = recipe.padding_value
            return lambda idx, w: self._pad(idx, w, value)
        if isinstance(recipe, PackRecipe) and not self.lengths:
            return lambda idx, w: self._pack(idx, w, recipe)
        return None  # pack with lengths=true: the collate itself says what it needs


def _bytes_of(array: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes, writable where it is (memoryview refuses to cast an empty one)."""
    return array.data.cast("B") if array.size else memoryview(bytearray())


def from_spec(rest: str) -> TokenDataset:
    path, opts = split_options(rest, {"offsets", "dtype", "lengths"})
    if not exists(path):
        raise ValueError(f"no such file {path!r}")
    offsets = opts.get("offsets")
    if offsets is None and not exists(sibling(where(path), "offsets.npy")):
        raise ValueError(f"no offsets= given and no offsets.npy beside {path!r}")
    if offsets is not None and not exists(offsets):
        raise ValueError(f"offsets: no such file {offsets!r}")
    dtype = opts.get("dtype")
    if dtype is not None and dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    lengths = parse_bool("lengths", opts.get("lengths", "false"))
    return TokenDataset(path, offsets, dtype, lengths)
