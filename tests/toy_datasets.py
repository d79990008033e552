"""Datasets, collates and exceptions the tests serve (importable by spawned server workers)."""

from __future__ import annotations

import os
import signal
import time
from collections import namedtuple
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset


class Plain(Dataset[tuple[torch.Tensor, int]]):
    """(float32[3] tensor, int label) samples; no __getitems__ (per-sample path)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.arange(3, dtype=torch.float32) + 10 * i, i % 7


class Nested(Dataset[dict[str, Any]]):
    """Samples exercising every leaf kind and container default_collate handles."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int) -> dict[str, Any]:
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4) + i
        return {
            "f16": base.half(),
            "bf16": base.bfloat16(),
            "bool": base > 5 + i,
            "i8": base.to(torch.int8),
            "scalar": torch.tensor(i * 2.5),  # 0-d
            "noncontig": base.t(),  # non-contiguous view
            "strided": base[:, ::2],
            "py_int": i,
            "py_float": i / 3,
            "py_bool": i % 2 == 0,
            "np": np.full((2,), i, dtype=np.int16),
            "np_scalar": np.float32(i),
            "name": f"sample-{i}",
            "pair": (torch.tensor([i, -i]), [i, i + 1]),
            "inner": {
                "u8": torch.full((2, 2), i, dtype=torch.uint8),
                7: torch.tensor([i], dtype=torch.int64),
            },
        }


class VarLen(Dataset[tuple[torch.Tensor, int]]):
    """int64 sequences of length 1 + i % 9, and the length."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = 1 + i % 9
        return torch.arange(n, dtype=torch.int64) + i, n


class Docs(Dataset[tuple[torch.Tensor, int]]):
    """int64 token ids (values < 1000) of 50 to 349 tokens, and the length: what ``pad``
    turns into compressible batches."""

    def __init__(self, n: int = 120) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = 50 + (i * 37) % 300
        return (torch.arange(n, dtype=torch.int64) * 7 + i * 13) % 1000, n


class Failing(Dataset[torch.Tensor]):
    """Raises on index 13."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 13:
            raise KeyError(f"corrupt record {i}")
        return torch.tensor([i])


class CorruptSample(Exception):
    """A dataset's own exception class: a client that imports this module can catch it by name."""


def _unknown_error(message: str) -> Exception:
    """An exception of a class whose module no client has imported (nor could: none of that name exists)."""
    cls = type(
        "Unreadable", (Exception,), {"__module__": "storage_backend.errors", "__qualname__": "Unreadable"}
    )
    return cls(message)


class Flaky(Dataset[tuple[torch.Tensor, int]]):
    """``n`` samples (float32[2] full of i, and i); those in ``bad`` raise: ``"key"`` a KeyError,
    ``"own"`` a :class:`CorruptSample`, ``"unknown"`` a class no client has."""

    def __init__(self, n: int = 70, bad: dict[int, str] | None = None) -> None:
        self.n = n
        self.bad = {5: "key", 23: "own", 24: "key", 41: "unknown", 60: "key"} if bad is None else dict(bad)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        kind = self.bad.get(i)
        if kind == "key":
            raise KeyError(f"corrupt record {i}")
        if kind == "own":
            raise CorruptSample(f"sample {i}: checksum mismatch")
        if kind == "unknown":
            raise _unknown_error(f"sample {i}: storage backend unreadable")
        return torch.full((2,), float(i)), i


class Crashing(Dataset[torch.Tensor]):
    """Kills its worker process on index 5."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 5:
            os._exit(3)
        return torch.tensor([i])


class Filled(Dataset[torch.Tensor]):
    """Sample i: float32[n] full of i, so a batch's content names the samples in it."""

    def __init__(self, length: int = 200, n: int = 16384) -> None:
        self.length, self.n = length, n

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((self.n,), float(i))


class Slow(Dataset[torch.Tensor]):
    """``tensor([i])`` after a short sleep per sample: builds take long enough to be interrupted."""

    def __init__(self, n: int = 64, delay: float = 0.01) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.tensor([i])


class Killed(Dataset[torch.Tensor]):
    """Its worker is killed by SIGKILL whenever it reads index 5 (as the OOM killer would)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor([i])


class Big(Dataset[torch.Tensor]):
    """3 MiB samples: batches outgrow the ring's initial slots."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((768, 1024), i, dtype=torch.int32)


class Growing(Dataset[torch.Tensor]):
    """Sample i holds (i + 1) x 256 KiB: sample 0 underestimates later batches."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full(((i + 1) * 64, 1024), i, dtype=torch.int32)


def sum_collate(samples: list[Any]) -> dict[str, torch.Tensor]:
    """A plain user collate: returns tensors outside the slot (copied in once)."""
    xs = torch.stack([s[0] for s in samples])
    return {"sum": xs.sum(dim=1), "count": torch.tensor(len(samples))}


# A small synthetic dataset served by ``batchferry serve`` in a process of its own
# (the ``restartable`` fixture), so tests can kill it and start it again.
RESTART_SPEC = "synthetic:n=300,shape=6,seed=4"


class FailsAt(Dataset[torch.Tensor]):
    """``n`` one-value samples; sample ``bad`` raises (deep inside a group of small batches)."""

    def __init__(self, n: int = 2000, bad: int = 1203) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise KeyError(f"corrupt record {i}")
        return torch.tensor([i])


class Spiky(Dataset[torch.Tensor]):
    """Short int32 sequences (``pad`` collate), but every ``every``-th holds 64 KiB: a batch in
    the middle of a group outgrows the slot sized for its small neighbours."""

    def __init__(self, n: int = 600, every: int = 211) -> None:
        self.n, self.every = n, every

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full(((1 << 20) if i and i % self.every == 0 else 1 + i % 3,), i, dtype=torch.int32)


class Point(NamedTuple):
    """A namedtuple sample type, imported wherever this module is."""

    x: torch.Tensor
    y: int


class Points(Dataset[Point]):
    """``Point(x=float32[3], y=int)`` samples, one ``__getitem__`` each."""

    def __init__(self, n: int = 30) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Point:
        return Point(torch.arange(3, dtype=torch.float32) * i, i % 4)


class PointsAtOnce(Points):
    """The same samples, read several at a time through ``__getitems__``."""

    def __getitems__(self, indices: list[int]) -> list[Point]:
        return [self[i] for i in indices]


# A namedtuple class whose module no client ever imports (it exists only where the
# samples are made): a client gets an equivalent class, not this one.
Reading = namedtuple("Reading", ["value", "where"], module="batchferry_tests_server_side")


class Readings(Dataset[Any]):
    """``Reading(value=int64[2], where=str)`` samples, of a class only the server has."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> Any:
        return Reading(torch.tensor([i, -i]), f"r{i}")


class Arrays(Dataset[dict[str, Any]]):
    """numpy samples: arrays, a numpy scalar, Python numbers and a string (``default_convert``
    turns the arrays and the numpy scalar into tensors and leaves the rest)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": np.full((2, 3), i, dtype=np.uint8),
            "weights": np.linspace(0, 1, 4, dtype=np.float32) * i,
            "np_scalar": np.int16(i),
            "label": i % 3,
            "score": i / 4,
            "pair": (np.arange(2, dtype=np.int64) + i, i),
            "name": f"s{i}",
        }


class Ints(Dataset[int]):
    """Samples that are plain Python ints."""

    def __len__(self) -> int:
        return 17

    def __getitem__(self, i: int) -> int:
        return i * 3


def double_first(sample: Any) -> dict[str, Any]:
    """A user collate made for ``batch_size=None`` (torch gives it one sample)."""
    return {"double": sample[0] * 2, "label": sample[1]}


class Unprintable(Exception):
    """An exception whose ``str()`` raises, as a careless one can."""

    def __str__(self) -> str:
        raise RuntimeError("str() of this exception fails")


class SlowAt(Dataset[torch.Tensor]):
    """``tensor([i])``; sample ``slow`` takes ``delay`` seconds, sample ``bad`` raises ``Unprintable``."""

    def __init__(self, n: int = 16, slow: int = -1, delay: float = 0.0, bad: int = -1) -> None:
        self.n, self.slow, self.delay, self.bad = n, slow, delay, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.slow:
            time.sleep(self.delay)
        if i == self.bad:
            raise Unprintable()
        return torch.tensor([i])
