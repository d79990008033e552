"""Datasets the server can own, and the ``NAME=SPEC`` strings of the CLI.

Specs:

* ``npy:PATH[,labels=PATH]``: a memory-mapped ``.npy`` array, one sample per row,
  with optional labels from a second ``.npy``; samples are ``(tensor, label)`` or
  a tensor.
* ``synthetic:n=N,shape=AxB,dtype=float32,classes=K,seed=S``: a deterministic,
  learnable in-memory classification set (the demo and benchmarks use it).
* ``python:MODULE:CALLABLE``: ``CALLABLE()`` from an importable module returns any
  map-style dataset (``__len__``, ``__getitem__``, optionally ``__getitems__``).

Worker processes rebuild spec datasets from the spec (cheap: memory maps reopen,
synthetic data regenerates) and receive Python objects by pickle.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "DatasetSource",
    "MapDataset",
    "NpyDataset",
    "SyntheticDataset",
    "parse_dataset_arg",
    "parse_spec",
]


@runtime_checkable
class MapDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


class NpyDataset:
    """Rows of a memory-mapped ``.npy`` file, optionally with labels."""

    def __init__(self, path: str | Path, labels: str | Path | None = None) -> None:
        self.path = Path(path)
        self.labels_path = Path(labels) if labels is not None else None
        self._open()

    def _open(self) -> None:
        self.data = np.load(self.path, mmap_mode="r")
        if self.data.ndim < 1:
            raise ValueError(f"{self.path}: a dataset array needs at least one dimension")
        self.labels = None
        if self.labels_path is not None:
            self.labels = np.load(self.labels_path, mmap_mode="r")
            if len(self.labels) != len(self.data):
                raise ValueError(
                    f"{self.labels_path} has {len(self.labels)} labels for {len(self.data)} samples"
                )

    # Pickle by path: a memmap would otherwise be pickled with all its data.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "labels_path": self.labels_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.labels_path = state["labels_path"]
        self._open()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        x = torch.from_numpy(np.array(self.data[index]))
        if self.labels is None:
            return x
        return x, self.labels[index].item()

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        # One gather from the map instead of one page walk per sample.
        rows = torch.from_numpy(self.data[np.asarray(indices, dtype=np.int64)])
        if self.labels is None:
            return list(rows)
        labels = self.labels[np.asarray(indices, dtype=np.int64)].tolist()  # Python scalars, as .item()
        return list(zip(rows, labels, strict=True))


class SyntheticDataset:
    """``n`` samples ``(x, label)``: x of ``shape``/``dtype``, label = a fixed linear teacher's argmax.

    Deterministic for a seed, and learnable, so the demo's loss goes down.
    """

    def __init__(
        self,
        n: int = 8192,
        shape: tuple[int, ...] = (32,),
        dtype: torch.dtype = torch.float32,
        classes: int = 10,
        seed: int = 0,
    ) -> None:
        if n < 1 or classes < 1 or any(s < 1 for s in shape):
            raise ValueError(
                f"synthetic dataset needs n, classes and shape >= 1, got {n}, {classes}, {shape}"
            )
        self.n, self.shape, self.dtype, self.classes, self.seed = (
            n,
            tuple(shape),
            dtype,
            classes,
            seed,
        )
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn((n, *self.shape), generator=gen)
        teacher = torch.randn((int(np.prod(self.shape)), classes), generator=gen)
        self.targets = (features.reshape(n, -1) @ teacher).argmax(dim=1)
        if dtype.is_floating_point:
            self.data = features.to(dtype)
        else:
            self.data = (features * 32 + 128).clamp(0, 255).to(dtype)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SyntheticDataset, (self.n, self.shape, self.dtype, self.classes, self.seed))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(self.data[idx], self.targets[idx], strict=True))


@dataclass(frozen=True)
class DatasetSource:
    """What a worker needs to get the dataset: a spec to rebuild, or the object itself."""

    spec: str | None = None
    obj: Any = None

    def build(self) -> MapDataset:
        return parse_spec(self.spec) if self.spec is not None else self.obj


def _kv(text: str, spec: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def parse_spec(spec: str) -> MapDataset:
    """Build the dataset a spec names; ``ValueError`` that names what is wrong."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"dataset spec {spec!r} has no kind; use npy:, synthetic: or python:")
    if kind == "npy":
        path, _, options = rest.partition(",")
        opts = _kv(options, spec)
        unknown = set(opts) - {"labels"}
        if unknown:
            raise ValueError(f"{spec!r}: unknown npy option(s) {sorted(unknown)}; known: labels")
        if not Path(path).is_file():
            raise ValueError(f"{spec!r}: no such file {path!r}")
        return NpyDataset(path, opts.get("labels"))
    if kind == "synthetic":
        opts = _kv(rest, spec)
        unknown = set(opts) - {"n", "shape", "dtype", "classes", "seed"}
        if unknown:
            raise ValueError(f"{spec!r}: unknown synthetic option(s) {sorted(unknown)}")
        dtype = getattr(torch, opts.get("dtype", "float32"), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{spec!r}: unknown dtype {opts.get('dtype')!r}")
        try:
            return SyntheticDataset(
                n=int(opts.get("n", 8192)),
                shape=tuple(int(s) for s in opts.get("shape", "32").split("x")),
                dtype=dtype,
                classes=int(opts.get("classes", 10)),
                seed=int(opts.get("seed", 0)),
            )
        except ValueError as exc:
            raise ValueError(f"{spec!r}: {exc}") from exc
    if kind == "python":
        module_name, sep, attr = rest.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"{spec!r}: expected python:MODULE:CALLABLE")
        module = importlib.import_module(module_name)
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ValueError(f"{spec!r}: {module_name}.{attr} is not a callable")
        dataset = factory()
        if not isinstance(dataset, MapDataset):
            raise ValueError(f"{spec!r}: {attr}() returned {type(dataset).__name__}, not a map-style dataset")
        return dataset
    raise ValueError(f"dataset spec {spec!r}: unknown kind {kind!r}; use npy:, synthetic: or python:")


def parse_dataset_arg(arg: str) -> tuple[str, str]:
    """Split a CLI ``NAME=SPEC`` argument."""
    name, sep, spec = arg.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--dataset expects NAME=SPEC, got {arg!r}")
    return name, spec
