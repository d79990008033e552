"""IterableDataset streams, worker side: logical iterators hosted in the pool's processes.

A stream of an IterableDataset asks for N iterators, as torch's DataLoader with
``num_workers=N`` makes N worker processes. Iterator ``i`` lives in one pool process
for the stream's life (every step of it goes to that process, in order), on its own
copy of the dataset (pickled, as torch sends the dataset to each worker), with what
torch gives a worker:

* ``torch.utils.data.get_worker_info()``: id ``i``, ``num_workers`` N, ``seed``
  ``base_seed + i`` and the copy, set while its code runs (None with N = 0, as in
  torch's loading in the main process);
* the RNGs torch seeds (``random``, ``torch``, ``numpy``), seeded as torch seeds them
  and kept per iterator: several iterators share a process, each sees only its own
  draws (the process's RNGs are swapped when another iterator, or a map-style batch,
  runs in between: a few hundred microseconds);
* :func:`get_shard_info`: the stream's rank and world size (sharded mode).

Each step builds the iterator's next batch as torch's fetcher does (``batch_size``
items, the last short unless ``drop_last``; with batch_size=None one item) or finds it
exhausted. After each batch the dataset's ``state_dict()`` (when it has one:
torchdata's Stateful protocol) is captured with ``torch.save``; a resumed iterator
loads it back (``torch.load(weights_only=True)``: plain data and tensors, never code)
before ``iter()``, or, for a dataset without one, replays and skips the batches it had made.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data._utils import worker as _torch_worker

__all__ = [
    "Exhausted",
    "HostedIterators",
    "IterStep",
    "ShardInfo",
    "get_shard_info",
    "host_of",
    "is_iterable",
]


class ShardInfo(NamedTuple):
    """The consumer a stream's iterators serve: rank ``rank`` of ``world_size`` (1 outside sharded mode)."""

    rank: int
    world_size: int


_shard = ShardInfo(0, 1)


def get_shard_info() -> ShardInfo:
    """Inside an IterableDataset's ``__iter__`` on a batchferry server: the rank and world
    size of the loader its stream serves (``ShardInfo(0, 1)`` elsewhere). It stands in for
    ``torch.distributed.get_rank()``/``get_world_size()``, which a server worker cannot call."""
    return _shard


def is_iterable(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


class Exhausted(Exception):
    """The iterator has no batch left (torch's fetcher raising StopIteration)."""


@dataclass(frozen=True)
class IterStep:
    """Build the next batch of iterator ``iterator`` of stream ``key``; its ``step``-th (from 0)."""

    key: tuple[int, int]  # the stream's ticket (index, generation): unique within the server
    iterator: int
    step: int
    num_workers: int  # the loader's num_workers: 0 is one iterator without worker info
    base_seed: int
    rank: int = 0
    world_size: int = 1
    batch_size: int | None = 1  # None: one item per batch, collated alone
    drop_last: bool = False
    skip: int = 0  # at the first step: batches to replay and drop first (resume without state)
    state: bytes = b""  # at the first step: the dataset's state_dict to load (resume)


@dataclass(eq=False)
class _Hosted:
    dataset: Any
    iterator: Iterator[Any]
    info: Any
    shard: ShardInfo
    rng: tuple[Any, torch.Tensor, Any]  # random, torch and numpy states between steps
    next_step: int = 0
    # Steps whose batch outgrew its slot, by step: built again from the same items.
    kept: dict[int, tuple[Any, bytes]] = field(default_factory=dict)
    ended: bool = False
    stateful: bool = False


@dataclass
class HostedIterators:
    """The iterators one process hosts, by (stream key, iterator); ``live(key)`` says
    whether a stream is still open (those of closed streams are dropped). How many there
    are is bounded where streams and jobs are: max_iterators per stream or shared job epoch."""

    hosted: dict[tuple[tuple[int, int], int], _Hosted] = field(default_factory=dict)
    # The iterator whose RNG states the process's RNGs hold now (its ``rng`` is stale): they
    # are swapped only when another iterator, or anything else, runs in between.
    owner: _Hosted | None = None

    def step(self, dataset: Any, step: IterStep) -> tuple[Any, bytes]:
        """The next batch's samples (a list; one item with batch_size None) and the
        dataset's state after it (b"" without ``state_dict``); Exhausted at the end."""
        key = (step.key, step.iterator)
        hosted = self.hosted.get(key)
        if hosted is None:
            if step.step:
                raise RuntimeError(
                    f"iterator {step.iterator} of this stream is gone (its worker process was "
                    "replaced): the stream cannot go on; resume from the loader's state_dict()"
                )
            hosted = self._open(dataset, step)
        kept = hosted.kept.pop(step.step, None)
        if kept is not None:
            return kept
        if hosted.next_step != step.step:
            raise RuntimeError(f"iterator {step.iterator}: step {step.step} asked, {hosted.next_step} due")
        hosted.next_step += 1
        with self._running(hosted):
            samples = _fetch(hosted, step.batch_size, step.drop_last)
            return samples, _state_of(hosted)

    def keep(self, step: IterStep, batch: tuple[Any, bytes]) -> None:
        """The step's batch outgrew its slot: its retry gets the same items (steps after it
        may have run meanwhile, so the iterator cannot simply give them again)."""
        hosted = self.hosted.get((step.key, step.iterator))
        if hosted is not None:
            hosted.kept[step.step] = batch

    def _open(self, dataset: Any, step: IterStep) -> _Hosted:
        # A copy per iterator, as torch pickles the dataset to each worker process.
        copy = pickle.loads(pickle.dumps(dataset))
        seed = step.base_seed + step.iterator
        info = (
            _torch_worker.WorkerInfo(id=step.iterator, num_workers=step.num_workers, seed=seed, dataset=copy)
            if step.num_workers
            else None
        )
        self.release()  # seeding takes the process's RNGs: the owner's states go back first
        saved = _rng_state()
        try:
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(_torch_worker._generate_state(step.base_seed, step.iterator))
            rng = _rng_state()
        finally:
            _set_rng(saved)
        hosted = _Hosted(copy, iter(()), info, ShardInfo(step.rank, step.world_size), rng)
        hosted.stateful = callable(getattr(copy, "state_dict", None)) and callable(
            getattr(copy, "load_state_dict", None)
        )
        with self._running(hosted):
            if step.state:
                if not hosted.stateful:
                    raise ValueError("a saved iterator state for a dataset without load_state_dict()")
                copy.load_state_dict(torch.load(io.BytesIO(step.state), weights_only=True))
            hosted.iterator = iter(copy)
            for _ in range(step.skip):  # replay: what the client took before, dropped
                try:
                    _fetch(hosted, step.batch_size, step.drop_last)
                except Exhausted:
                    break
                except Exception:  # a batch that failed: its error was raised then
                    continue
        self.hosted[(step.key, step.iterator)] = hosted
        return hosted

    def prune(self, live: Any) -> None:
        """Drop the iterators of streams that have ended."""
        for key in [k for k in self.hosted if not live(k[0])]:
            if self.hosted.pop(key) is self.owner:
                self.owner = None

    def release(self) -> None:
        """Something else is to run in this process: the owner's RNG states go back to it."""
        if self.owner is not None:
            self.owner.rng = _rng_state()
            self.owner = None

    @contextlib.contextmanager
    def _running(self, hosted: _Hosted) -> Iterator[None]:
        """Run the iterator's code as in its own torch worker: its worker info, shard and RNGs."""
        global _shard
        if self.owner is not hosted:
            self.release()
            _set_rng(hosted.rng)
            self.owner = hosted
        _torch_worker._worker_info = hosted.info
        _shard = hosted.shard
        try:
            yield
        finally:
            _torch_worker._worker_info = None
            _shard = ShardInfo(0, 1)


def host_of(step: IterStep, processes: int) -> int:
    """Which of ``processes`` hosts the step's iterator: every step of it goes there."""
    return (step.key[1] + step.iterator) % processes


def _fetch(hosted: _Hosted, batch_size: int | None, drop_last: bool) -> Any:
    """As torch's _IterableDatasetFetcher: a batch of ``batch_size`` items, or Exhausted."""
    if hosted.ended:
        raise Exhausted
    if batch_size is None:
        try:
            return next(hosted.iterator)
        except StopIteration:
            hosted.ended = True
            raise Exhausted from None
    data = []
    for _ in range(batch_size):
        try:
            data.append(next(hosted.iterator))
        except StopIteration:
            hosted.ended = True
            break
    if not data or (drop_last and len(data) < batch_size):
        raise Exhausted
    return data


def _state_of(hosted: _Hosted) -> bytes:
    if not hosted.stateful:
        return b""
    buffer = io.BytesIO()
    torch.save(hosted.dataset.state_dict(), buffer)
    return buffer.getvalue()


def _rng_state() -> tuple[Any, torch.Tensor, Any]:
    return random.getstate(), torch.get_rng_state(), np.random.get_state()


def _set_rng(state: tuple[Any, torch.Tensor, Any]) -> None:
    random.setstate(state[0])
    torch.set_rng_state(state[1])
    np.random.set_state(state[2])
