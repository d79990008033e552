"""IterableDatasets for the IterableDataset tests (importable by spawned server and torch workers).

Each item carries draws from the three RNGs torch seeds in a worker (``random``,
``torch``, ``numpy``), so an item is torch's only if its worker was seeded as torch
seeds it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from batchferry.server import get_shard_info

N = 23  # items; odd, so workers get uneven shares and drop_last matters


def _item(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    draws = [random.random(), float(torch.rand(())), float(np.random.rand())]
    return torch.tensor([i, i * i]), torch.tensor(draws, dtype=torch.float64)


class Split(IterableDataset[Any]):
    """Items 0..n-1 split by worker (worker w of W takes i % W == w), and with
    ``by_rank`` by shard first (the rank's items i % world_size == rank): from
    get_shard_info(), or ``shard`` (rank, world_size) for torch's loader."""

    def __init__(self, n: int = N, by_rank: bool = False, shard: tuple[int, int] | None = None) -> None:
        self.n, self.by_rank, self.shard = n, by_rank, shard

    def __iter__(self) -> Iterator[Any]:
        items = range(self.n)
        if self.by_rank:
            rank, world_size = self.shard or get_shard_info()
            items = items[rank::world_size]
        info = get_worker_info()
        if info is not None:
            items = items[info.id :: info.num_workers]
        for i in items:
            yield _item(i)


class Whole(IterableDataset[Any]):
    """Items 0..n-1 in every worker (no splitting: each worker yields them all, as in torch)."""

    def __init__(self, n: int = 9) -> None:
        self.n = n

    def __iter__(self) -> Iterator[Any]:
        return (_item(i) for i in range(self.n))


class Uneven(IterableDataset[Any]):
    """Worker w yields 3 * (w + 1) items: iterators run out at different times."""

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        return (_item(100 * w + k) for k in range(3 * (w + 1)))


class Sized(Split):
    """Split, with a __len__ (torch's len(loader) and its warning when it is wrong)."""

    def __init__(self, n: int = N, reported: int = N) -> None:
        super().__init__(n)
        self.reported = reported

    def __len__(self) -> int:
        return self.reported


class Counter(IterableDataset[Any]):
    """Stateful (torchdata's protocol): items from its position on, split by worker; the
    state is the position, so a resumed copy starts where the saved one was."""

    def __init__(self, n: int = N) -> None:
        self.n = n
        self.position = 0
        self.loaded = False

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.loaded = True

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.loaded:
            self.position = w
        while self.position < self.n:
            i = self.position
            self.position += count
            yield torch.tensor([i, i * i])


class CorruptItem(Exception):
    """The dataset's own exception class."""


class Raising(IterableDataset[Any]):
    """Items 0..n-1 split by worker, from an iterator that raises CorruptItem at ``bad``
    items and goes on after (a class, not a generator: a generator ends when it raises)."""

    def __init__(self, n: int = N, bad: frozenset[int] = frozenset({5, 12})) -> None:
        self.n, self.bad = n, bad

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, count = (info.id, info.num_workers) if info is not None else (0, 1)
        return _RaisingIterator(list(range(w, self.n, count)), self.bad)


class _RaisingIterator:
    def __init__(self, items: list[int], bad: frozenset[int]) -> None:
        self.items, self.bad = items, bad

    def __iter__(self) -> _RaisingIterator:
        return self

    def __next__(self) -> torch.Tensor:
        if not self.items:
            raise StopIteration
        i = self.items.pop(0)
        if i in self.bad:
            raise CorruptItem(f"item {i} is corrupt")
        return torch.tensor([i, i * i])


class Growing(IterableDataset[Any]):
    """Items 0..n-1 split by worker, the first four small and the rest of 1.6 MB: a batch
    outgrows the slot sized from the first item, and is built again in a larger one."""

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, count = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(w, self.n, count):
            yield torch.full((1 if i < 4 else 400_000,), float(i))


class Slow(IterableDataset[Any]):
    """Items 0..n-1, ``delay`` seconds each: an epoch long enough to kill a worker in."""

    def __init__(self, n: int = 400, delay: float = 0.02) -> None:
        self.n, self.delay = n, delay

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.n):
            time.sleep(self.delay)
            yield torch.tensor([i, os.getpid()])


def split() -> Split:
    """For ``batchferry serve --dataset split=python:iterable_data:split``."""
    return Split()


def datasets() -> dict[str, Any]:
    return {
        "split": Split(),
        "whole": Whole(),
        "uneven": Uneven(),
        "sized": Sized(),
        "sized_short": Sized(reported=5),
        "counter": Counter(),
        "raising": Raising(),
        "slow": Slow(),
        "growing": Growing(),
        "ranked": Split(by_rank=True),
    }
