"""Epoch orders with exact parity to ``torch.utils.data.DataLoader``.

Torch, per new iterator over a DataLoader with ``generator=g``:

1. draws one int64 from ``g`` (the workers' base seed), at ``iter()``;
2. with ``shuffle=True``, ``RandomSampler`` takes ``torch.randperm(n, generator=g)``;
3. when the epoch is fully consumed, it calls ``torch.randperm(n, generator=g)``
   once more and discards it (the ``num_samples % n`` tail of its loop).

Without a generator the base seed comes from torch's global RNG, and
``RandomSampler`` seeds a fresh generator from a second global draw.

The client performs step 1 (and the unseeded seeding) on its own generator and
sends the resulting state; the server performs steps 2 and 3 on a copy and sends
back the states after each, so the client's generator advances exactly as
torch's would. Nothing here touches the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from batchferry.protocol import Bitmap

__all__ = [
    "EpochOrder",
    "begin_iteration",
    "epoch_order",
    "num_batches",
    "remaining",
    "replay_epoch",
    "rest_order",
    "seeded_order",
    "shard_length",
    "sharded_order",
]


def num_batches(length: int, batch_size: int, drop_last: bool) -> int:
    return length // batch_size if drop_last else -(-length // batch_size)


def begin_iteration(
    generator: torch.Generator | None,
    shuffle: bool,
    draw_base_seed: bool = True,
    order: torch.Generator | Literal["same"] | None = "same",
) -> bytes:
    """Do the draws torch makes when an iterator is created; return the sampler state.

    The result is the generator state the epoch's permutation is drawn from
    (empty without shuffle). ``draw_base_seed`` is False where torch reuses its
    iterator (persistent workers) and so draws no new base seed. The base seed comes
    from the loader's ``generator``, the permutation from its RandomSampler's: ``order``
    where that is another (torch's sampler keeps the generator it was made with).
    """
    if draw_base_seed:
        torch.empty((), dtype=torch.int64).random_(generator=generator)
    if not shuffle:
        return b""
    if order != "same":
        generator = order
    if generator is None:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(seed)
    return bytes(generator.get_state().numpy().tobytes())


def generator_from_state(state: bytes) -> torch.Generator:
    """A CPU generator at ``state``; ``ValueError`` when the bytes are not one."""
    gen = torch.Generator()
    try:
        gen.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"not a torch CPU generator state ({len(state)} bytes)") from exc
    return gen


def state_bytes(generator: torch.Generator) -> bytes:
    return bytes(generator.get_state().numpy().tobytes())


@dataclass(frozen=True)
class EpochOrder:
    """The sample order of one epoch, and the generator states torch would leave.

    Position ``p`` of the epoch is sample ``base[(offset + stride * p) % n]`` (``base``
    None: the identity). Plain orders have offset 0 and stride 1; rank r of a
    DistributedSampler reads the padded permutation with offset r and stride
    world_size. So an order costs one permutation at most, shared by every stream
    (and every rank) that reads it, and nothing at all without shuffling.
    """

    n: int  # samples in the dataset
    count: int  # positions in this epoch
    base: torch.Tensor | None = None  # a permutation of range(n) (int32 where it fits), or None
    offset: int = 0
    stride: int = 1
    state_after_order: bytes = b""
    state_after_epoch: bytes = b""

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        """Sample indices (int64) of batch ``index``."""
        return self.batches(index, 1, batch_size)

    def batches(self, first: int, count: int, batch_size: int) -> torch.Tensor:
        """Sample indices (int64) of ``count`` consecutive batches from ``first``, one after another."""
        lo = first * batch_size
        hi = min(lo + count * batch_size, self.count)
        if hi <= lo:
            return torch.empty(0, dtype=torch.int64)
        start, last = self.offset + self.stride * lo, self.offset + self.stride * (hi - 1)
        if self.stride == 1 and last < self.n:
            positions = slice(start, last + 1)  # no wrap: a plain slice
            return self.base[positions].long() if self.base is not None else torch.arange(start, last + 1)
        pos = torch.arange(lo, hi, dtype=torch.int64).mul_(self.stride).add_(self.offset).remainder_(self.n)
        return self.base[pos].long() if self.base is not None else pos

    @property
    def indices(self) -> torch.Tensor:
        """Every sample index of the epoch, in order (int64)."""
        return self.batch(0, self.count) if self.count else torch.empty(0, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes if self.base is not None else 0


def permutation(length: int, generator: torch.Generator) -> torch.Tensor:
    """``torch.randperm(length, generator=generator)``, kept as int32 where it fits."""
    perm = torch.randperm(length, generator=generator)
    return perm.int() if length <= torch.iinfo(torch.int32).max else perm


def epoch_order(length: int, shuffle: bool, sampler_state: bytes) -> EpochOrder:
    if not shuffle:
        return EpochOrder(length, length)
    gen = generator_from_state(sampler_state)
    order = permutation(length, gen)
    after_order = state_bytes(gen)
    torch.randperm(length, generator=gen)  # torch draws and discards this one
    return EpochOrder(
        length, length, order, state_after_order=after_order, state_after_epoch=state_bytes(gen)
    )


def replay_epoch(generator: torch.Generator, length: int, shuffle: bool) -> None:
    """Advance ``generator`` as one fully consumed torch epoch would."""
    state = begin_iteration(generator, shuffle)
    if shuffle:
        generator.set_state(
            torch.frombuffer(bytearray(epoch_order(length, True, state).state_after_epoch), dtype=torch.uint8)
        )


def seeded_order(length: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor | None:
    """The whole-dataset order of an epoch in job modes, as DistributedSampler draws it (None: in order)."""
    if not shuffle:
        return None
    gen = torch.Generator()
    gen.manual_seed(seed + epoch)
    return permutation(length, gen)


def shard_length(length: int, world_size: int, drop_last: bool) -> int:
    """Samples per rank, as ``DistributedSampler.num_samples``."""
    if drop_last and length % world_size:
        return math.ceil((length - world_size) / world_size)
    return math.ceil(length / world_size)


def sharded_order(
    length: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    drop_last: bool,
    base: torch.Tensor | None = None,
    consumed: bytes = b"",
) -> EpochOrder:
    """Rank ``rank``'s indices of ``DistributedSampler(..., drop_last)`` after ``set_epoch(epoch)``.

    DistributedSampler pads the permutation by repeating it from the start (or cuts
    it, with drop_last) and gives rank r every world_size-th index from r: position p
    of the shard is ``perm[(r + world_size * p) % n]``. ``base`` is that epoch's
    ``seeded_order`` when the caller has it already. ``consumed`` (a bitmap over the
    order's positions) marks what earlier worlds of a resized job took: the rest of
    the order (:func:`rest_order`, or ``base`` when the caller has it already), in
    order, is what this world splits the same way.
    """
    if consumed:
        base = rest_order(length, shuffle, seed, epoch, consumed) if base is None else base
        length = len(base)
    elif not shuffle:
        base = None
    elif base is None:
        base = seeded_order(length, shuffle, seed, epoch)
    count = shard_length(length, world_size, drop_last)
    return EpochOrder(length, count, base, offset=rank, stride=world_size)


def rest_order(length: int, shuffle: bool, seed: int, epoch: int, consumed: bytes) -> torch.Tensor:
    """The indices of an epoch's order (``seeded_order``) left after ``consumed``, in order."""
    keep = torch.from_numpy(remaining(length, consumed))
    base = seeded_order(length, shuffle, seed, epoch)
    return base[keep] if base is not None else keep.int()


def remaining(length: int, consumed: bytes) -> np.ndarray:
    """The positions of an epoch's order of ``length`` that ``consumed`` (a bitmap) leaves, in order."""
    return np.flatnonzero(~Bitmap(consumed).mask(length))
