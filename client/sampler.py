"""Samplers: the caller's own (``sampler=``, ``batch_sampler=``), run in the client as torch
runs them, and the ones ``loader.sampler`` shows where none was given (:func:`torch_samplers`).

torch's DataLoader, per new iterator: draws one int64 from its ``generator`` (or the
global RNG), then takes index lists from ``batch_sampler`` (or from
``BatchSampler(sampler, batch_size, drop_last)``). :class:`ClientSampling` does the
same, then sends each index list to the server that builds that batch, a credit
window ahead of need. The sampler's own randomness is consumed exactly as torch
consumes it, so order, content and RNG state match torch epoch after epoch.

Resuming mid-epoch replays the epoch: the RNG states it started from (the loader's
generator, the sampler's ``generator`` if it has one, torch's global RNG) are saved
in ``state_dict()``; loading them and skipping the batches already taken gives the
same remaining batches. A sampler with ``state_dict()``/``load_state_dict()`` has its
state saved at the epoch's start too; one that draws from other RNGs (Python's
``random``, numpy) must give the same order when replayed (for example by
``set_epoch``) or keep such a state.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler
from torch.utils.data.dataloader import _InfiniteConstantSampler

from batchferry import sampling
from batchferry.errors import InvalidArgument

if TYPE_CHECKING:
    from .loader import DataLoader

__all__ = ["ClientSampling", "EpochIndices", "torch_samplers"]


@dataclass(frozen=True)
class _Start:
    """The RNG states an epoch began from: what replaying it needs."""

    generator: bytes
    global_rng: bytes
    sampler_generator: bytes
    sampler_state: Any  # the sampler's own state_dict(), if it keeps one
    # A DistributedSampler's (num_replicas, rank): its shards are the sampler's own.
    world: tuple[int, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator,
            "global_rng": self.global_rng,
            "sampler_generator": self.sampler_generator,
            "sampler_state": self.sampler_state,
            "world": self.world,
        }


class ClientSampling:
    """Index lists from the caller's sampler or batch sampler, as torch's DataLoader draws them."""

    def __init__(
        self,
        sampler: Iterable[int] | None,
        batch_sampler: Iterable[list[int]] | None,
        batch_size: int,
        drop_last: bool,
    ) -> None:
        if batch_sampler is None:
            assert sampler is not None
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        for name, obj in (("sampler", sampler), ("batch_sampler", batch_sampler)):
            if obj is not None and not isinstance(obj, Iterable):
                raise InvalidArgument(f"{name} must be an iterable of indices, got {type(obj).__name__}")
        self.sampler = sampler
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        if not isinstance(self.batch_sampler, Sized):
            raise TypeError("the batch sampler has no len()")
        return len(self.batch_sampler)

    def world(self) -> tuple[int, int] | None:
        """The (num_replicas, rank) of a DistributedSampler-like sampler, else None."""
        inner = self._inner()
        replicas, rank = getattr(inner, "num_replicas", None), getattr(inner, "rank", None)
        return (replicas, rank) if isinstance(replicas, int) and isinstance(rank, int) else None

    def _inner(self) -> Any:
        """The sampler whose generator and state matter (the batch sampler's own sampler, else it)."""
        return self.sampler if self.sampler is not None else getattr(self.batch_sampler, "sampler", None)

    def begin(self, generator: torch.Generator | None, draw_base_seed: bool = True) -> EpochIndices:
        """Start an epoch: what torch's DataLoader does when it makes an iterator."""
        start = self._snapshot(generator)
        if draw_base_seed:
            torch.empty((), dtype=torch.int64).random_(generator=generator)
        return EpochIndices(iter(self.batch_sampler), start)

    def resume(self, generator: torch.Generator | None, saved: dict[str, Any], skip: int) -> EpochIndices:
        """Replay an epoch from the states it began from, skipping ``skip`` batches."""
        start = _Start(**{**saved, "world": self.world()})
        if generator is not None and start.generator:
            generator.set_state(_state(start.generator))
        if start.global_rng:
            torch.set_rng_state(_state(start.global_rng))
        inner = self._inner()
        sampler_gen = getattr(inner, "generator", None)
        if isinstance(sampler_gen, torch.Generator) and start.sampler_generator:
            sampler_gen.set_state(_state(start.sampler_generator))
        if start.sampler_state is not None and hasattr(inner, "load_state_dict"):
            inner.load_state_dict(start.sampler_state)
        epoch = self.begin(generator)
        epoch.start = start
        for _ in range(skip):
            if epoch.pull() is None:
                break
        return epoch

    def _snapshot(self, generator: torch.Generator | None) -> _Start:
        inner = self._inner()
        sampler_gen = getattr(inner, "generator", None)
        sampler_state = inner.state_dict() if hasattr(inner, "state_dict") else None
        return _Start(
            generator=sampling.state_bytes(generator) if generator is not None else b"",
            global_rng=bytes(torch.get_rng_state().numpy().tobytes()),
            sampler_generator=(
                sampling.state_bytes(sampler_gen) if isinstance(sampler_gen, torch.Generator) else b""
            ),
            sampler_state=sampler_state,
            world=self.world(),
        )


class EpochIndices:
    """One epoch's index lists, pulled on demand and kept until their batch is taken."""

    def __init__(self, batches: Iterator[Any], start: _Start) -> None:
        self._batches = batches
        self.start = start
        self.pulled = 0  # index lists taken from the sampler so far
        self.total: int | None = None  # known once the sampler is exhausted

    def pull(self) -> np.ndarray | None:
        """The next batch's sample indices (int64), or None at the end of the epoch."""
        if self.total is not None:
            return None
        try:
            batch = next(self._batches)
        except StopIteration:
            self.total = self.pulled
            return None
        samples = np.asarray(batch, dtype=np.int64).reshape(-1)
        if samples.size == 0:
            raise InvalidArgument(f"the batch sampler gave an empty batch (batch {self.pulled})")
        self.pulled += 1
        return samples


def _state(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def torch_samplers(
    loader: DataLoader[Any], sampler: Any, batch_sampler: Any, generator: torch.Generator | None
) -> tuple[Any, Any]:
    """``loader.sampler`` and ``loader.batch_sampler`` as torch's DataLoader makes them: those
    given, else ``RandomSampler`` (with the shuffle's generator) or ``SequentialSampler`` over
    ``loader.dataset``, and ``BatchSampler(sampler, batch_size, drop_last)``; in sharded mode
    the ``DistributedSampler`` whose indices the rank gets; for an IterableDataset torch's
    ``_InfiniteConstantSampler``."""
    cfg, ds = loader.config, loader.dataset
    if sampler is None and ds.iterable:
        sampler = _InfiniteConstantSampler()  # torch's for an IterableDataset: batches of Nones
    elif sampler is None and cfg.mode == "sharded":
        sampler = _RankSampler(loader)
    elif sampler is None:
        sampler = RandomSampler(ds, generator=generator) if cfg.shuffle else SequentialSampler(ds)
    if batch_sampler is None and loader.batch_size is not None:
        batch_sampler = BatchSampler(sampler, loader.batch_size, loader.drop_last)
    return sampler, batch_sampler


class _RankSampler(DistributedSampler[int]):
    """The DistributedSampler whose indices a sharded rank gets. Frameworks call its
    ``set_epoch(e)`` before each epoch; the loader then yields epoch e."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        cfg = loader.config
        super().__init__(loader.dataset, cfg.world_size, cfg.rank, cfg.shuffle, cfg.seed, cfg.drop_last)
        self._loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        loader = self._loader()
        if loader is not None and loader.epoch != epoch:
            loader.set_epoch(epoch)
