"""``webdataset:SHARDS[,fields=..][,cache_dir=DIR][,resize=..][,crop=..][,mode=RGB]``: WebDataset tar shards.

``SHARDS`` is a path with brace patterns (``/data/train-{000000..000146}.tar``,
``{a,b}``), several joined by ``::``. Files group into samples as WebDataset
groups them: the key is the member path up to the first dot of its base name,
the extension (lower-cased) the rest; consecutive members with one key form a
sample; names without a dot and ``__*__`` metadata are skipped.

Map-style access reads each member at its offset. The offsets are an index built
once per shard by one pass over its headers and cached beside the shard
(``SHARD.index.json``), or in ``cache_dir`` when given or when the shard's folder
is not writable; an index is rebuilt when its shard's size or time changes.
Shards must be uncompressed tar files.

``SHARDS`` may be URLs of object storage (see :mod:`._remote`), with brace patterns
and ``*``/``?`` globs: each shard is fetched into the cache whole, its index built
once and kept in the cache (outside its size limit, keyed by the shard's version),
and reading a shard starts fetching the next ``fetch_ahead``.

Members decode by extension: images (``jpg``, ``png``, ... through Pillow, see
:mod:`._images`) to uint8 CHW tensors; ``cls``/``cls2``/``index``/``inx``/``id`` to
int; ``txt``/``text`` to str; ``json`` to its value; ``npy`` to a tensor; anything
else (pickles included: nothing is unpickled) to a uint8 tensor of its bytes.
A sample is a dict ``{"__key__": key, ext: value, ...}``, or with ``fields=jpg|png,cls``
a tuple with one entry per field (``|`` separates alternatives, first present wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import SampleError, relative, split_options
from ._images import ImageDecode, pillow
from ._remote import RemoteFile, Store, is_url, local_path

__all__ = ["TarShardDataset", "expand_braces", "from_spec"]

_OPTIONS = {"fields", "cache_dir", "resize", "crop", "mode"}
_INDEX_VERSION = 1
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")
_IMAGES = {"jpg", "jpeg", "png", "ppm", "pgm", "pbm", "pnm", "bmp", "webp", "tif", "tiff", "gif"}
_INTS = {"cls", "cls2", "index", "inx", "id"}
_TEXTS = {"txt", "text", "transcript"}
_JSON = {"json", "jsn"}
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` -> x, y; left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        lo, hi = numeric.group(1), numeric.group(2)
        width = len(lo) if lo.startswith("0") or hi.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


@dataclass(frozen=True)
class _Shard:
    path: Path | str  # a URL for a remote shard
    size: int
    # Per sample: key, and per extension (data offset, size, member name).
    samples: list[tuple[str, dict[str, tuple[int, int, str]]]]


def _scan(path: Path) -> list[tuple[str, dict[str, tuple[int, int, str]]]]:
    samples: list[tuple[str, dict[str, tuple[int, int, str]]]] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if not info.isreg() or _META.match(info.name):
                continue
            match = _KEY.match(info.name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            fields = samples[-1][1]
            if ext in fields:
                raise ValueError(f"{info.name}: a second {ext!r} member for key {key!r}")
            fields[ext] = (info.offset_data, info.size, info.name)
    return samples


def _index_path(shard: Path, cache_dir: Path | None) -> Path:
    if cache_dir is None and os.access(shard.parent, os.W_OK):
        return shard.with_name(shard.name + ".index.json")
    base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "batchferry"
    digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    return base / "webdataset" / f"{shard.name}-{digest}.index.json"


def load_index(shard: Path, root: Path, cache_dir: Path | None = None) -> _Shard:
    """The shard's index, read from its cache or built (and cached) by one pass over the headers."""
    name = relative(shard, root)
    try:
        stat = shard.stat()
    except OSError as exc:
        raise ValueError(f"{name}: {exc.strerror or exc}") from exc
    stamp = {"version": _INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cached = _index_path(shard, cache_dir)
    samples = _stored_index(cached, stamp)  # None when missing or stale: build it
    return _Shard(shard, stat.st_size, samples or _build_index(shard, name, cached, stamp))


def _build_index(
    shard: Path, name: str, cached: Path, stamp: dict[str, int]
) -> list[tuple[str, dict[str, tuple[int, int, str]]]]:
    """Scan the shard's headers; keep the index in ``cached`` where that can be written."""
    try:
        samples = _scan(shard)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ValueError(f"{name}: not a readable uncompressed tar file: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**stamp, "samples": samples}))
        tmp.replace(cached)  # atomic: concurrent builders write the same content
    except OSError:
        pass  # a read-only place: the index lives in memory only
    return samples


def _stored_index(
    cached: Path, stamp: dict[str, int]
) -> list[tuple[str, dict[str, tuple[int, int, str]]]] | None:
    try:
        data = json.loads(cached.read_text())
        if {k: data.get(k) for k in stamp} == stamp:
            return [
                (key, {e: (int(v[0]), int(v[1]), str(v[2])) for e, v in f.items()})
                for key, f in data["samples"]
            ]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return None


def load_remote_index(store: Store, f: RemoteFile, *, stored_only: bool = False) -> _Shard | None:
    """A remote shard's index, from the cache's index folder, or built from the shard fetched
    (``stored_only``: None instead)."""
    stamp = {"version": _INDEX_VERSION, "size": f.size}
    cached = store.index_path(f, ".index.json")  # the key changes with the object's version
    samples = _stored_index(cached, stamp)
    if samples is None and stored_only:
        return None
    if samples is None:
        samples = store.read(f, None, lambda path: _build_index(path, f.url, cached, stamp))
    return _Shard(f.url, f.size, samples)


def _must(shard: _Shard | None) -> _Shard:
    assert shard is not None  # built when not stored
    return shard


class TarShardDataset:
    """Samples of WebDataset tar shards, by index (see the module docstring).

    Examples:
        >>> ds = TarShardDataset("/data/train-{000..009}.tar", fields=["jpg|png", "cls"])  # doctest: +SKIP
        >>> image, label = ds[0]
    """

    def __init__(
        self,
        shards: str | Sequence[str | Path],
        *,
        fields: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        decoder: ImageDecode | None = None,
        store: Store | None = None,
    ) -> None:
        names = shards.split("::") if isinstance(shards, str) else [str(p) for p in shards]
        self.store: Store | None = None
        self._remote: list[RemoteFile] = []
        if any(is_url(n) for n in names):
            if not all(is_url(n) for n in names):
                raise ValueError("shards are either all URLs or all local paths")
            self.store = store or Store()
            self._remote = [f for n in names for f in self.store.expand(n, expand_braces)]
            paths: list[Path] | list[str] = [f.url for f in self._remote]
        elif isinstance(shards, str):
            paths = [Path(local_path(p)) for part in names for p in expand_braces(part)]
        else:
            paths = [Path(local_path(p)) for p in names]
        if not paths:
            raise ValueError("no shards given")
        self.paths = paths
        self.root = (
            Path() if self.store else Path(os.path.commonpath([Path(p).resolve().parent for p in paths]))
        )
        self.fields = [f.split("|") for f in fields] if fields else None
        if self.fields is not None and any(not alt for f in self.fields for alt in f):
            raise ValueError(f"fields: empty field name in {fields!r}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.decoder = decoder or ImageDecode()
        if self.store is not None:
            stored = [load_remote_index(self.store, f, stored_only=True) for f in self._remote]
            # The shards not indexed yet download together, while the first are scanned.
            self.store.fetch_ahead(
                [f for f, i in zip(self._remote, stored, strict=True) if i is None], len(stored)
            )
            self._shards = [
                i or _must(load_remote_index(self.store, f))
                for f, i in zip(self._remote, stored, strict=True)
            ]
        else:
            self._shards = [load_index(Path(p), self.root, self.cache_dir) for p in paths]
        counts = [len(s.samples) for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fds: dict[int, int] = {}  # shard -> descriptor, opened per process on first read
        if any(e.rsplit(".", 1)[-1] in _IMAGES for s in self._shards for _, m in s.samples[:1] for e in m):
            pillow()  # fail at start, naming the extra, rather than at the first batch

    def __reduce__(self) -> tuple[Any, ...]:
        fields = ["|".join(f) for f in self.fields] if self.fields else None
        return (_rebuild, (self.paths, fields, self.cache_dir, self.decoder, self.store))

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(Exception):  # also at interpreter exit
                os.close(fd)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[_Shard, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._shards[s], s

    def _name(self, shard: _Shard) -> str:
        """A shard as messages name it: relative to the shards' folder, or its URL."""
        return str(shard.path) if self.store else relative(shard.path, self.root)

    def _open(self, index: int, s: int, shard: _Shard) -> int:
        """A descriptor of shard ``s``: remote ones fetched first, the next ones fetched ahead."""
        if self.store is None:
            return os.open(shard.path, os.O_RDONLY)
        self.store.fetch_ahead(self._remote[s + 1 :])
        # Only a few shards stay open, so that the cache can free the space of evicted ones.
        while len(self._fds) > self.store.settings.fetch_ahead + 1:
            os.close(self._fds.pop(next(iter(self._fds))))
        return self.store.read(self._remote[s], index, lambda path: os.open(path, os.O_RDONLY))

    def _read(self, index: int, s: int, shard: _Shard, offset: int, size: int, member: str) -> bytes:
        where = f"{self._name(shard)} (member {member})"
        fd = self._fds.get(s)
        try:
            if fd is None:
                fd = self._open(index, s, shard)
                if os.fstat(fd).st_size != shard.size:
                    os.close(fd)
                    raise SampleError(index, where, "the shard changed since its index was built")
                self._fds[s] = fd
            data = os.pread(fd, size, offset)
        except FileNotFoundError:
            raise SampleError(index, where, "shard not found") from None
        except OSError as exc:
            raise SampleError(index, where, f"cannot read: {exc}") from exc
        if len(data) != size:
            raise SampleError(index, where, f"read {len(data)} of {size} bytes; truncated shard?")
        return data

    def _decode(self, index: int, ext: str, data: bytes, where: str) -> Any:
        last = ext.rsplit(".", 1)[-1]
        try:
            if last in _IMAGES:
                return self.decoder.decode(data)
            if last in _INTS:
                return int(data.decode().strip())
            if last in _TEXTS:
                return data.decode()
            if last in _JSON:
                return json.loads(data)
            if last == "npy":
                return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise SampleError(index, where, f"cannot decode .{ext}: {exc}") from exc
        return (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        shard, s = self._locate(index)
        key, members = shard.samples[index - int(self._starts[s])]

        def value(ext: str) -> Any:
            offset, size, member = members[ext]
            data = self._read(index, s, shard, offset, size, member)
            return self._decode(index, ext, data, f"{self._name(shard)} (member {member})")

        if self.fields is None:
            return {"__key__": key, **{ext: value(ext) for ext in members}}
        out = []
        for alternatives in self.fields:
            ext = next((e for e in alternatives if e in members), None)
            if ext is None:
                raise SampleError(
                    index,
                    self._name(shard),
                    f"key {key!r} has no {'|'.join(alternatives)} member",
                )
            out.append(value(ext))
        return tuple(out)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return [self[i] for i in indices]


def _rebuild(
    paths: list[Path] | list[str],
    fields: list[str] | None,
    cache_dir: Path | None,
    decoder: ImageDecode,
    store: Store | None = None,
) -> TarShardDataset:
    return TarShardDataset(paths, fields=fields, cache_dir=cache_dir, decoder=decoder, store=store)


def from_spec(rest: str) -> TarShardDataset:
    pattern, opts = split_options(rest, _OPTIONS)
    fields = opts["fields"].split(",") if "fields" in opts else None
    return TarShardDataset(
        pattern, fields=fields, cache_dir=opts.get("cache_dir"), decoder=ImageDecode.from_options(opts)
    )
