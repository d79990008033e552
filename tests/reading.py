"""Ways of reading loaders the tests share: in step, at once on threads, through errors."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def in_step(loaders: Sequence[Iterable[Any]], batches: int) -> list[list[Any]]:
    """``batches`` from each loader, taken in turn, so that consumers of one shared job stay
    inside its window together."""
    iters = [iter(loader) for loader in loaders]
    got: list[list[Any]] = [[] for _ in loaders]
    for _ in range(batches):
        for seq, it in zip(got, iters, strict=True):
            seq.append(next(it))
    return got


def read_concurrently(loaders: Sequence[Iterable[Any]], timeout: float = 60.0) -> list[list[Any]]:
    """Every batch of each loader's epoch, the loaders read at once on threads of their own."""
    got: list[list[Any]] = [[] for _ in loaders]
    threads = [
        threading.Thread(target=seq.extend, args=(loader,)) for seq, loader in zip(got, loaders, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return got


def outcomes(it: Iterator[Any], bound: int = 100_000) -> list[Any]:
    """What each ``next()`` of an epoch gave, as a loop that catches errors and goes on sees
    it: a batch, or the exception raised in its place; AssertionError without StopIteration
    after ``bound`` calls."""
    got: list[Any] = []
    for _ in range(bound):
        try:
            got.append(next(it))
        except StopIteration:
            return got
        except Exception as exc:
            got.append(exc)
    raise AssertionError(f"no StopIteration after {bound} next() calls")
