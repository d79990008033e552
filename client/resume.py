"""A loader's saved state: what ``state_dict()`` writes and ``load_state_dict()`` accepts.

The state is small and plain (ints, strings, bytes): the loader's settings it must
match, the epoch, the generator's state, and within an epoch where it got to (the
batches taken: a count in order, a bitmap in any order), the order's generator state
and, with the caller's own sampler, the RNG states the epoch began from. It also
records where it was saved (mode, job, rank, world size, replicas, stripes, dataset
length): loading it elsewhere continues exactly (:mod:`.rescale`) or is refused,
naming what differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, TypeGuard

import numpy as np

from batchferry import protocol, sampling
from batchferry.errors import InvalidArgument
from batchferry.protocol import Bitmap

from .options import LoaderConfig
from .rescale import rescaled

__all__ = ["Resume", "World", "check_length", "check_state", "resizes", "state_of"]

# Settings a state must agree with (the batches it counts are those batches), and what a
# state saved before a setting existed stands for.
_MATCH: dict[str, object] = {
    "dataset": None,
    "batch_size": None,
    "shuffle": None,
    "drop_last": None,
    "unbatched": False,
}
# The loader's place among others: a state saved before these were recorded maps as it is.
_WORLD = ("mode", "job", "rank", "world_size")


@dataclass(frozen=True)
class Resume:
    """Where the next ``iter()`` starts within a saved epoch."""

    epoch: int
    batch: int
    sampler_state: bytes
    done: bytes = b""
    epoch_start: dict[str, Any] | None = None  # the caller's sampler: the RNG states to replay
    consumed: bytes = b""  # sharded, resized: the order's positions earlier worlds took
    # An IterableDataset: its workers' base seed, per iterator the batches taken and its
    # dataset's state_dict() after them (torch.save bytes; empty: replayed), the next iterator.
    base_seed: int = 0
    places: tuple[tuple[int, bytes], ...] = ()
    next_iterator: int = 0


@dataclass(frozen=True)
class World:
    """Where a loader reads from: what a state records, and what loading one checks."""

    # None where the loader has not asked its servers yet (loading a state does not ask,
    # unless it must map a resized epoch; the dataset's length is checked at iter()).
    length: int | None  # samples in the dataset
    replicas: int | None
    stripes: int | None
    # The caller's DistributedSampler-like sampler: its (num_replicas, rank).
    sampler_world: tuple[int, int] | None = None


def state_of(
    config: LoaderConfig, world: World | None, epoch: int, generator_state: bytes, resume: Resume | None
) -> dict[str, Any]:
    """The state_dict of a loader at ``epoch`` (``resume``: within it; ``world``: None
    before the loader has talked to its servers)."""
    state: dict[str, Any] = {
        "version": protocol.STATE_VERSION,
        **{key: getattr(config, key) for key in _MATCH},
        # The world it was saved in (a loader in another world maps it, or says why not).
        **{key: getattr(config, key) for key in _WORLD},
        **({k: v for k, v in asdict(world).items() if k != "sampler_world"} if world is not None else {}),
        # Job modes order epoch e by seed + e: a position means nothing under another seed.
        **({"seed": config.seed} if config.mode != "independent" else {}),
        "epoch": epoch,
        # True while an epoch has begun (its draws made) and not ended.
        "in_epoch": False,
        "batch": 0,
        "sampler_state": b"",
        "generator_state": generator_state,
    }
    if resume is not None:
        state["epoch"], state["batch"], state["sampler_state"] = (
            resume.epoch,
            resume.batch,
            resume.sampler_state,
        )
        # Out of order (in_order=False, dynamic mode): which batches were taken.
        state["done"] = resume.done
        if resume.epoch_start is not None:
            state["epoch_start"] = resume.epoch_start
        if resume.places:
            state["iterators"] = {
                "base_seed": resume.base_seed,
                "batches": [batches for batches, _ in resume.places],
                "states": [saved for _, saved in resume.places],
                "next": resume.next_iterator,
            }
        state["in_epoch"] = True
        if resume.consumed:
            state["consumed"] = resume.consumed
    return state


def check_state(
    config: LoaderConfig, world: World, state: Any, client_sampler: bool
) -> tuple[int, bytes, Resume | None]:
    """``state`` checked against this loader: its epoch, generator state and resume point
    (in this loader's world). Every problem raises an InvalidArgument naming the key."""
    if not isinstance(state, dict) or state.get("version") != protocol.STATE_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise InvalidArgument(f"state_dict version must be {protocol.STATE_VERSION}, got {got!r}")
    for key, absent in _MATCH.items():
        if state.get(key, absent) != getattr(config, key):
            raise InvalidArgument(
                f"state_dict {key} is {state.get(key, absent)!r} but this loader has {getattr(config, key)!r}"
            )
    _check_place(config, world, state)
    epoch, batch = state.get("epoch"), state.get("batch")
    if not _count(epoch) or not _count(batch):
        raise InvalidArgument(
            f"state_dict epoch and batch must be non-negative ints, got {epoch!r}, {batch!r}"
        )
    gen_state = state.get("generator_state", b"")
    sampler_state = state.get("sampler_state", b"")
    done = state.get("done", b"")
    consumed = state.get("consumed", b"")
    raw = {"generator_state": gen_state, "sampler_state": sampler_state, "done": done, "consumed": consumed}
    for key, value in raw.items():
        if not isinstance(value, bytes):
            raise InvalidArgument(f"state_dict {key} must be bytes, got {type(value).__name__}")
    in_epoch = state.get("in_epoch", False)
    if not isinstance(in_epoch, bool):
        raise InvalidArgument(f"state_dict in_epoch must be a bool, got {in_epoch!r}")
    if gen_state:
        try:
            sampling.generator_from_state(gen_state)
        except ValueError as exc:
            raise InvalidArgument(f"state_dict generator_state: {exc}") from exc
    epoch_start = state.get("epoch_start")
    if epoch_start is not None and (not isinstance(epoch_start, dict) or not client_sampler):
        raise InvalidArgument("state_dict epoch_start belongs to a loader with a sampler or batch_sampler")
    if in_epoch and client_sampler and epoch_start is None:
        raise InvalidArgument("state_dict has no epoch_start: it was not saved by a loader with a sampler")
    saved_world = epoch_start.get("world") if epoch_start is not None else None
    if in_epoch and saved_world is not None and tuple(saved_world) != world.sampler_world:
        raise InvalidArgument(
            f"state_dict was saved mid-epoch with a sampler of (num_replicas, rank) {tuple(saved_world)}, "
            f"and this loader's is {world.sampler_world}: a loader with its own sampler cannot carry an "
            "epoch into another world (only the sampler knows its shards); resume at an epoch's end, or use "
            "mode='sharded', whose epochs resize exactly"
        )
    if not in_epoch:
        return epoch, gen_state, None
    batch, done = _in_terms_of(batch, done, config.any_order)
    resume = Resume(epoch, batch, sampler_state, done, epoch_start, consumed)
    if "iterators" in state:
        resume = _with_iterators(resume, state["iterators"], config.num_workers)
    if config.mode == "sharded":
        resume = _into_world(config, world, state, resume, client_sampler)
    return epoch, gen_state, resume


def _check_place(config: LoaderConfig, world: World, state: dict[str, Any]) -> None:
    """A state belongs to its mode, job and dataset; another is refused, saying which."""
    if "mode" in state and state["mode"] != config.mode:
        raise InvalidArgument(
            f"state_dict was saved by a {state['mode']!r} mode loader; this one is {config.mode!r}: "
            "a state continues only in the mode it was saved in"
        )
    if "job" in state and state["job"] != config.job:
        raise InvalidArgument(
            f"state_dict was saved in job {state['job']!r}; this loader is in job {config.job!r}: "
            f"pass job={state['job']!r} to continue it"
        )
    if config.mode != "independent" and "seed" in state and state["seed"] != config.seed:
        raise InvalidArgument(
            f"state_dict was saved with seed={state['seed']!r}; this loader has seed={config.seed!r}: "
            "job modes order epoch e by seed + e, so a position under one seed means nothing under "
            f"another; pass seed={state['seed']!r} to continue it"
        )
    if world.length is not None:
        check_length(config, state.get("length"), world.length)
    for key in ("rank", "world_size", "replicas", "stripes"):
        if key in state and not _count(state[key]):
            raise InvalidArgument(f"state_dict {key} must be a non-negative int, got {state[key]!r}")


def check_length(config: LoaderConfig, saved: Any, length: int) -> None:
    """A state saved over ``saved`` samples (None: not recorded) read from a dataset of ``length``."""
    if saved is not None and saved != length:
        raise InvalidArgument(
            f"state_dict was saved over {saved!r} samples, and dataset {config.dataset!r} has "
            f"{length} now: a position in one dataset means nothing in another"
        )


def resizes(config: LoaderConfig, state: Any) -> bool:
    """Whether ``state`` is a sharded epoch saved in a world of another size (mapping it
    needs the dataset's length)."""
    return (
        config.mode == "sharded"
        and isinstance(state, dict)
        and bool(state.get("in_epoch"))
        and state.get("world_size", config.world_size) != config.world_size
    )


def _into_world(
    config: LoaderConfig, world: World, state: dict[str, Any], resume: Resume, client_sampler: bool
) -> Resume:
    """A sharded epoch saved by ``state``'s rank and world, continued by this loader's:
    as it is in the same world, the rest split anew in another (:mod:`.rescale`)."""
    saved_world = state.get("world_size", config.world_size)
    saved_rank = state.get("rank", config.rank)
    if saved_world == config.world_size:
        if resume.done and saved_rank != config.rank:
            raise InvalidArgument(
                f"state_dict was saved by rank {saved_rank} with in_order=False: the batches it took are "
                f"its own; load rank {config.rank}'s own state (or merge_states of every rank's)"
            )
        return resume
    where = f"saved by a sharded job of {saved_world} ranks, loaded into one of {config.world_size}"
    if resume.places:
        raise InvalidArgument(
            f"state_dict was {where}: an IterableDataset splits its stream among ranks its own way "
            "(get_shard_info()), so an epoch of it continues only in the same world size; resume "
            "at an epoch's end, or keep the world size"
        )
    if client_sampler:
        raise InvalidArgument(
            f"state_dict was {where}: a loader with its own sampler cannot carry an epoch into another "
            "world size (only the sampler knows its shards); resume at an epoch's end, or keep the world size"
        )
    if resume.done:
        raise InvalidArgument(
            f"state_dict was {where}, with in_order=False: one rank's state does not say what the others "
            "took; load merge_states([every rank's state]) instead"
        )
    assert world.length is not None  # resizes(): the loader asked its servers
    took = {rank: np.arange(resume.batch) for rank in range(saved_world)}
    consumed = rescaled(world.length, resume.consumed, saved_world, took, config.batch_size, config.drop_last)
    return replace(resume, batch=0, done=b"", consumed=consumed)


def _with_iterators(resume: Resume, saved: Any, num_workers: int) -> Resume:
    """An IterableDataset's iterators' places, checked against this loader's num_workers."""
    count = max(1, num_workers)
    if not isinstance(saved, dict):
        raise InvalidArgument(f"state_dict iterators must be a dict, got {type(saved).__name__}")
    seed, batches, states, turn = (saved.get(k) for k in ("base_seed", "batches", "states", "next"))
    if not isinstance(batches, list) or not isinstance(states, list) or len(batches) != len(states):
        raise InvalidArgument("state_dict iterators: batches and states must be lists of one length")
    if len(batches) != count:
        raise InvalidArgument(
            f"state_dict iterators: saved by a loader with {len(batches)} iterator(s) (num_workers), "
            f"this one has {count}; an IterableDataset's workers split it their own way: resume "
            "with the same num_workers"
        )
    if not all(_count(b) for b in batches) or not all(isinstance(s, bytes) for s in states):
        raise InvalidArgument("state_dict iterators: batches must be non-negative ints, states bytes")
    if isinstance(seed, bool) or not isinstance(seed, int) or not _count(turn) or turn >= count:
        raise InvalidArgument(f"state_dict iterators: base_seed must be an int and next in [0, {count})")
    places = tuple(zip(batches, states, strict=True))
    return replace(resume, base_seed=seed, places=places, next_iterator=turn)


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _in_terms_of(batch: int, done: bytes, any_order: bool) -> tuple[int, bytes]:
    """A saved resume point (``batch`` taken; out of order, ``done`` says which) in the
    terms of a loader that takes batches ``any_order`` or not, whichever saved it."""
    taken = Bitmap(done)
    if any_order:
        if not taken and batch:  # saved in order: the first ``batch`` were taken
            taken = Bitmap.from_bits(np.ones(batch, dtype=bool))
        return len(taken), bytes(taken)
    prefix = taken.prefix()
    if len(taken) > prefix:
        raise InvalidArgument(
            f"state_dict was saved mid-epoch by a loader that took batches out of order (in_order=False "
            f"or dynamic mode): {len(taken)} taken, not the first {len(taken)}; resume it with "
            "in_order=False, or at an epoch's end"
        )
    return (prefix if taken else batch), b""
