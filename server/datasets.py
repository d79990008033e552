"""Datasets the server can own, and the ``NAME=SPEC`` strings that name them.

A spec is ``KIND:REST``. Built-in kinds (each a module of :mod:`.sources`; the
documentation's "Datasets and collates" page lists their options):

* ``npy:PATH[,labels=PATH]``, ``synthetic:n=N,...``, ``python:MODULE:CALLABLE``;
* ``mnist:ROOT``, ``imagefolder:ROOT``, ``webdataset:SHARDS``, ``parquet:PATH``, ``hf:PATH``;
* ``tokens:PATH[,offsets=PATH,dtype=...]`` (documents of a flat token array).

Any other kind is looked up in the ``batchferry.datasets`` entry-point group: a
package that declares ::

    [project.entry-points."batchferry.datasets"]
    myformat = "mypkg.loader:from_spec"

serves ``myformat:REST`` with ``from_spec(REST)``, which returns a map-style
dataset or a ``torch.utils.data.IterableDataset`` (``ValueError`` for a bad spec).

A dataset may offer ``batch_gatherer()``, returning ``gather(indices, writer)``
that builds what ``default_collate`` would from those samples with one take per
field, straight into the slot (see :mod:`.sources._gather`), or None; and
``collate_gatherer(recipe)``, the same for the collates that carry a recipe
(``pad``, ``pack``; see :mod:`.fetch`).

Worker processes rebuild spec datasets from the spec and receive Python objects by
pickle: sources pickle by path and open their files lazily in each process.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from .iterators import is_iterable
from .sources import MissingDependency, NpyDataset, SyntheticDataset
from .sources._remote import StorageSettings, redact, refuse_credentials, using

__all__ = [
    "ENTRY_POINT_GROUP",
    "DatasetSource",
    "MapDataset",
    "NpyDataset",
    "SyntheticDataset",
    "dataset_kinds",
    "parse_dataset_arg",
    "parse_spec",
]

ENTRY_POINT_GROUP = "batchferry.datasets"

# kind -> module of .sources with from_spec(rest)
_BUILTIN = {
    "hf": "hf",
    "imagefolder": "imagefolder",
    "mnist": "mnist",
    "npy": "npy",
    "parquet": "parquet",
    "synthetic": "synthetic",
    "tokens": "tokens",
    "webdataset": "webdataset",
}


@runtime_checkable
class MapDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


@dataclass(frozen=True)
class DatasetSource:
    """What a worker needs to get the dataset: a spec to rebuild (with the server's settings of
    object storage), or the object itself."""

    spec: str | None = None
    obj: Any = None
    storage: StorageSettings | None = None

    def build(self) -> Any:
        """The dataset: map-style, or an IterableDataset (docs/iterable.md)."""
        if self.spec is None:
            return self.obj
        with using(self.storage):
            return parse_spec(self.spec)


def _python(rest: str) -> Any:
    module_name, sep, attr = rest.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError("expected python:MODULE:CALLABLE")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name}.{attr} is not a callable")
    dataset = factory()
    if not (isinstance(dataset, MapDataset) or is_iterable(dataset)):
        raise ValueError(
            f"{attr}() returned {type(dataset).__name__}, not a map-style dataset or an IterableDataset"
        )
    return dataset


def _entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append(ep)
    return found


def dataset_kinds() -> list[str]:
    """Every spec kind this process can serve: built in, ``python``, and entry points."""
    return sorted({*_BUILTIN, "python", *_entry_points()})


def _factory(kind: str) -> Callable[[str], Any]:
    if kind in _BUILTIN:
        module = importlib.import_module(f".sources.{_BUILTIN[kind]}", __package__)
        factory: Callable[[str], Any] = module.from_spec
        return factory
    if kind == "python":
        return _python
    candidates = _entry_points().get(kind, [])
    if not candidates:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(dataset_kinds())}")
    # The same entry point seen twice (e.g. an editable install on sys.path twice) is one.
    if len({ep.value for ep in candidates}) > 1:
        owners = ", ".join(f"{ep.value}" for ep in candidates)
        raise ValueError(f"kind {kind!r} is declared by several {ENTRY_POINT_GROUP} entry points: {owners}")
    try:
        loaded = candidates[0].load()
    except Exception as exc:
        raise ValueError(f"kind {kind!r}: cannot load entry point {candidates[0].value}: {exc}") from exc
    if not callable(loaded):
        raise ValueError(f"kind {kind!r}: entry point {candidates[0].value} is not callable")
    entry: Callable[[str], Any] = loaded
    return entry


def parse_spec(spec: str) -> Any:
    """Build the dataset a spec names: map-style or an IterableDataset; ``ValueError``
    naming the spec and what is wrong.

    Messages show the spec with any URL's credentials hidden; a spec carrying them is refused.
    """
    shown = redact(spec)
    kind, sep, rest = spec.partition(":")
    if not sep or not kind:
        raise ValueError(
            f"dataset spec {shown!r} has no kind; expected KIND:..., kinds: {', '.join(dataset_kinds())}"
        )
    try:
        refuse_credentials(rest)
        dataset = _factory(kind)(rest)
    except MissingDependency as exc:
        raise MissingDependency(f"dataset spec {shown!r}: {exc}", name=exc.name) from exc
    except ValueError as exc:
        raise ValueError(f"dataset spec {shown!r}: {exc}") from exc
    if not (isinstance(dataset, MapDataset) or is_iterable(dataset)):
        raise ValueError(
            f"dataset spec {shown!r}: got a {type(dataset).__name__}, not a map-style dataset "
            "or an IterableDataset"
        )
    return dataset


def parse_dataset_arg(arg: str) -> tuple[str, str]:
    """Split a CLI ``NAME=SPEC`` argument."""
    name, sep, spec = arg.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--dataset expects NAME=SPEC, got {arg!r}")
    return name, spec
