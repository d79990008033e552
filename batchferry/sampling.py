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

import torch

__all__ = [
    "EpochOrder",
    "begin_iteration",
    "epoch_order",
    "num_batches",
    "replay_epoch",
    "seeded_order",
    "shard_length",
    "sharded_order",
]


def num_batches(length: int, batch_size: int, drop_last: bool) -> int:
    return length // batch_size if drop_last else -(-length // batch_size)


def begin_iteration(generator: torch.Generator | None, shuffle: bool) -> bytes:
    """Do the draws torch makes when an iterator is created; return the sampler state.

    The result is the generator state the epoch's permutation is drawn from
    (empty without shuffle).
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    if not shuffle:
        return b""
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
    """The sample order of one epoch, and the generator states torch would leave."""

    indices: torch.Tensor  # int64, len(dataset)
    state_after_order: bytes
    state_after_epoch: bytes

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        return self.indices[index * batch_size : (index + 1) * batch_size]


def epoch_order(length: int, shuffle: bool, sampler_state: bytes) -> EpochOrder:
    if not shuffle:
        return EpochOrder(torch.arange(length, dtype=torch.int64), b"", b"")
    gen = generator_from_state(sampler_state)
    order = torch.randperm(length, generator=gen)
    after_order = state_bytes(gen)
    torch.randperm(length, generator=gen)  # torch draws and discards this one
    return EpochOrder(order, after_order, state_bytes(gen))


def replay_epoch(generator: torch.Generator, length: int, shuffle: bool) -> None:
    """Advance ``generator`` as one fully consumed torch epoch would."""
    state = begin_iteration(generator, shuffle)
    if shuffle:
        generator.set_state(
            torch.frombuffer(bytearray(epoch_order(length, True, state).state_after_epoch), dtype=torch.uint8)
        )


def seeded_order(length: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The whole-dataset order of an epoch in job modes, as DistributedSampler draws it."""
    if not shuffle:
        return torch.arange(length, dtype=torch.int64)
    gen = torch.Generator()
    gen.manual_seed(seed + epoch)
    return torch.randperm(length, generator=gen)


def shard_length(length: int, world_size: int, drop_last: bool) -> int:
    """Samples per rank, as ``DistributedSampler.num_samples``."""
    if drop_last and length % world_size:
        return math.ceil((length - world_size) / world_size)
    return math.ceil(length / world_size)


def sharded_order(
    length: int, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int, drop_last: bool
) -> EpochOrder:
    """Rank ``rank``'s indices of ``DistributedSampler(..., drop_last)`` after ``set_epoch(epoch)``."""
    indices = seeded_order(length, shuffle, seed, epoch)
    total = shard_length(length, world_size, drop_last) * world_size
    if drop_last:
        indices = indices[:total]
    elif total > length:
        # Pad by repeating from the start, as DistributedSampler does.
        repeats = math.ceil((total - length) / length)
        indices = torch.cat([indices, indices.repeat(repeats)[: total - length]])
    return EpochOrder(indices[rank:total:world_size], b"", b"")
