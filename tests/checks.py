"""Assertions the tests share: batches equal in structure and values, no shared memory left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from batchferry import shm


def leaked_segments() -> list[str]:
    """Segments whose owner is gone (other test sessions may own live ones meanwhile)."""
    return shm.stale()


def own_segments(pid: int | None = None) -> list[str]:
    """Segments of servers running in process ``pid`` (this one by default)."""
    return shm.owned_by(os.getpid() if pid is None else pid)


def assert_same(a: Any, b: Any, path: str = "batch") -> None:
    """Structure, types, dtypes and values equal (tuples of torch batches become lists)."""
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor), f"{path}: {type(a).__name__} is not a tensor"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(a.cpu(), b.cpu()), f"{path}: values differ"
    elif isinstance(b, dict):
        assert isinstance(a, dict) and list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in b:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


@contextmanager
def no_new_segments() -> Iterator[None]:
    before = set(own_segments())
    yield
    after = set(own_segments()) | set(leaked_segments())
    assert after <= before, f"leaked: {sorted(after - before)}"
