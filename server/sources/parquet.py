"""``parquet:PATH[,columns=a,b,...]``: rows of a Parquet file, or of every ``*.parquet`` under a directory.

Files are taken in sorted path order; their schemas must agree on the selected
columns. A sample is a dict ``{column: value}`` in ``columns`` order (default: every
column), each value as :mod:`._arrow` describes: numbers and fixed-size lists
become tensors gathered with one take per column, strings stay strings.

The file footers are read at start (a corrupt file fails then, by name); each
file's rows are read once per process when a sample first needs them, and held in
memory, decompressed.

``PATH`` may be a URL of object storage (see :mod:`._remote`): a ``.parquet`` file, a
brace or ``*`` pattern of them, or a folder (every ``*.parquet`` under it). Each file
is fetched into the cache whole; reading one starts fetching the next ``fetch_ahead``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batchferry.layout import SlotWriter

from . import _arrow
from ._common import SampleError, relative, require, split_options
from ._gather import Gather
from ._images import ImageDecode
from ._remote import FetchError, RemoteFile, Store, is_url, local_path

__all__ = ["ParquetDataset", "from_spec"]


def _pq() -> Any:
    return require("pyarrow.parquet", "parquet", "the parquet: source")


class ParquetDataset:
    """Rows of Parquet files as dicts of tensors and strings.

    Examples:
        >>> ds = ParquetDataset("/data/train/", columns=["embedding", "label"])  # doctest: +SKIP
        >>> ds[0]["embedding"].shape
    """

    def __init__(
        self, path: str | Path, columns: Sequence[str] | None = None, store: Store | None = None
    ) -> None:
        pq = _pq()
        self.store: Store | None = None
        self._remote: list[RemoteFile] = []
        if is_url(path):
            self.path: str | Path = str(path)
            self.store = store or Store()
            self._remote = _listing(self.store, self.path)
            self.root: str | Path = self.path.rstrip("/") if not self.path.endswith(".parquet") else ""
            self.files: list[str] | list[Path] = [f.url for f in self._remote]
            self.store.fetch_ahead(self._remote, len(self._remote))  # their footers are read next
        else:
            self._local(Path(local_path(str(path))))
        schema = None
        counts = []
        for i in range(len(self.files)):
            try:
                meta = self._read(i, None, pq.ParquetFile)
            except FetchError:
                raise
            except Exception as exc:
                raise ValueError(f"{self._name(i)}: not a readable Parquet file: {exc}") from exc
            file_schema = meta.schema_arrow
            counts.append(meta.metadata.num_rows)
            names = list(columns) if columns else file_schema.names
            missing = [c for c in names if c not in file_schema.names]
            if missing:
                raise ValueError(
                    f"{self._name(i)}: no column(s) {', '.join(map(repr, missing))}; "
                    f"it has {', '.join(file_schema.names)}"
                )
            if schema is None:
                schema = file_schema
                self.columns = names
            elif any(schema.field(c).type != file_schema.field(c).type for c in self.columns):
                raise ValueError(f"{self._name(i)}: column types differ from {self._name(0)}'s")
        self._kinds = [(c.name, c.kind) for c in _arrow.column_kinds(schema, self.columns)]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._loaded: dict[int, list[_arrow.Column]] = {}  # file -> its columns, read on first use
        self._decoder = ImageDecode()

    def _local(self, path: Path) -> None:
        self.path = path
        if self.path.is_dir():
            self.root = self.path
            self.files = sorted(p for p in self.path.rglob("*.parquet") if p.is_file())
            if not self.files:
                raise ValueError(f"no *.parquet files under {str(path)!r}")
        elif self.path.is_file():
            self.root, self.files = self.path.parent, [self.path]
        else:
            raise ValueError(f"no such file or directory {str(path)!r}")

    def _name(self, f: int) -> str:
        """File ``f`` as messages name it: relative to the folder given, or its URL."""
        return self._remote[f].url if self._remote else relative(self.files[f], self.root)

    def _read(self, f: int, index: int | None, reader: Any) -> Any:
        """``reader(local path of file f)``, fetching it first (and the next ones) if remote."""
        if self.store is None:
            return reader(self.files[f])
        self.store.fetch_ahead(self._remote[f + 1 :])
        return self.store.read(self._remote[f], index, reader)

    def __reduce__(self) -> tuple[Any, ...]:
        return (ParquetDataset, (self.path, self.columns, self.store))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _file(self, f: int, index: int) -> list[_arrow.Column]:
        """File ``f``'s columns, read on first use (``index``: the sample that needs it)."""
        columns = self._loaded.get(f)
        if columns is None:
            name = self._name(f)
            try:
                read = _pq().read_table
                table = self._read(f, index, lambda p: read(p, columns=self.columns)).combine_chunks()
                columns = _arrow.column_kinds(table.schema, self.columns)
                _arrow.bind(columns, table, lambda column: name)
            except SampleError:
                raise
            except Exception as exc:
                raise SampleError(index, name, f"cannot read: {exc}") from exc
            self._loaded[f] = columns
        return columns

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return _arrow.sample_fields(self._file(f, index), index - int(self._starts[f]), self._decoder)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]

    def batch_gatherer(self) -> Gather | None:
        if not _arrow.can_gather(kind for _, kind in self._kinds):
            return None

        def gather(idx: np.ndarray, writer: SlotWriter) -> dict[str, Any]:
            files = np.searchsorted(self._starts, idx, side="right") - 1
            parts = []
            for f in np.unique(files).tolist():
                positions = np.flatnonzero(files == f)
                rows = idx[positions] - self._starts[f]
                parts.append((self._file(f, int(idx[positions[0]])), rows, positions))
            return _arrow.gather_columns(parts, len(idx), writer)

        return gather


def _listing(store: Store, url: str) -> list[RemoteFile]:
    """The Parquet files a URL names: itself, a pattern's matches, or a folder's ``*.parquet``."""
    from .webdataset import expand_braces  # noqa: PLC0415  (one brace syntax for every source)

    if url.endswith(".parquet"):
        return store.expand(url, expand_braces)
    files = [f for f in store.find(url) if f.url.endswith(".parquet")]
    if not files:
        raise ValueError(f"no *.parquet files under {url!r}")
    return files


def from_spec(rest: str) -> ParquetDataset:
    path, opts = split_options(rest, {"columns"})
    columns = [c.strip() for c in opts["columns"].split(",") if c.strip()] if "columns" in opts else None
    return ParquetDataset(path, columns)
