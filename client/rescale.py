"""A saved epoch carried into another world: sharded jobs resized mid-epoch, and the
states of every consumer of a job merged into one (:func:`merge_states`).

Synchronous data-parallel ranks take the same number of batches, so one rank's state
says how far the whole job got: rank r of W, after b batches, took positions
``r, r + W, ...`` of the epoch's padded order, b * batch_size of them; all W ranks
together took its first ``W * b * batch_size`` positions. What they took is kept as
``consumed``, a bitmap over the positions of the epoch's order (not sample ids: the
loader never needs the order itself). The new world splits the rest of the order, in
order, as DistributedSampler splits a dataset, so a second resize within the same
epoch works the same way. The next epoch is DistributedSampler's for the new world.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from batchferry import sampling
from batchferry.errors import InvalidArgument
from batchferry.protocol import Bitmap

__all__ = ["merge_states", "rescaled"]

# Keys every state of one job agrees on; "world_size" is checked apart.
_SAME_JOB = (
    "version", "dataset", "batch_size", "shuffle", "drop_last", "unbatched", "mode", "job", "seed", "epoch",
)  # fmt: skip


def rescaled(
    length: int, consumed: bytes, world: int, took: dict[int, np.ndarray], batch_size: int, drop_last: bool
) -> bytes:
    """``consumed`` and what each rank of ``world`` took (rank -> its batch indices), after
    ``consumed`` was taken by earlier worlds: rank r's k-th sample is position
    ``r + world * k`` of the rest of the order (padded by repeating it, as DistributedSampler)."""
    bits = Bitmap(consumed).mask(length)
    rest = np.flatnonzero(~bits)
    if not len(rest):
        return bytes(Bitmap.from_bits(bits))
    per_rank = sampling.shard_length(len(rest), world, drop_last)
    for rank, batches in took.items():
        ks = (np.asarray(batches, dtype=np.int64)[:, None] * batch_size + np.arange(batch_size)).ravel()
        bits[rest[(rank + world * ks[ks < per_rank]) % len(rest)]] = True
    return bytes(Bitmap.from_bits(bits))


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state standing for every consumer of a job: load it into each loader of the
    job's next run, whatever its size.

    - ``sharded``: one state of each rank (they may have taken different numbers of
      batches): the merged state marks every sample any rank took; the next run's
      ranks split the rest.
    - ``dynamic``: the batches any consumer took.
    - ``shared`` and ``independent``: each loader resumes from its own state; states
      that agree merge to themselves, others are refused.

    Every state must be of the same job, dataset, settings and epoch; a difference
    raises an InvalidArgument naming it.
    """
    if not states:
        raise InvalidArgument("merge_states: no states given")
    for state in states:
        if not isinstance(state, dict):
            raise InvalidArgument(f"merge_states: a state_dict is a dict, got {type(state).__name__}")
    first = states[0]
    for key in _SAME_JOB:
        values = {repr(s.get(key)) for s in states}
        if len(values) > 1:
            raise InvalidArgument(f"merge_states: the states disagree on {key}: {', '.join(sorted(values))}")
    if {bool(s.get("in_epoch")) for s in states} == {False}:
        return dict(first)  # all at an epoch's end: nothing to merge
    if any("iterators" in s for s in states):
        raise InvalidArgument(
            "merge_states: states of an IterableDataset cannot be merged (each iterator's place is its "
            "own); resume each loader from its own state"
        )
    if any("epoch_start" in s for s in states):
        raise InvalidArgument(
            "merge_states: states of loaders with their own sampler cannot be merged (only the "
            "sampler knows what each took); resume each from its own state, or at an epoch's end"
        )
    mode = first.get("mode")
    if mode == "sharded":
        return _merge_sharded(states)
    if mode == "dynamic":
        taken = [np.frombuffer(_taken_bitmap(s), dtype=np.uint8) for s in states]
        union = np.zeros(max(len(raw) for raw in taken), dtype=np.uint8)
        for raw in taken:
            union[: len(raw)] |= raw
        done = Bitmap(union.tobytes().rstrip(b"\0"))
        return dict(first, in_epoch=True, done=bytes(done), batch=len(done))
    positions = {(s.get("in_epoch"), s.get("batch"), s.get("done", b"")) for s in states}
    if len(positions) > 1:
        raise InvalidArgument(
            f"merge_states: {mode} loaders each resume from their own state, and these are at "
            f"different places ({len(positions)} of them); load each loader's own"
        )
    return dict(first)


def _taken_bitmap(state: dict[str, Any]) -> bytes:
    """A state's taken batches as a bitmap (in order: its first ``batch``)."""
    if not state.get("in_epoch"):
        return b""
    done = state.get("done", b"")
    if done:
        return bytes(done)
    return bytes(Bitmap.from_bits(np.ones(int(state.get("batch", 0)), dtype=bool)))


def _merge_sharded(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    first = states[0]
    worlds = {s.get("world_size") for s in states}
    if len(worlds) > 1:
        raise InvalidArgument(
            f"merge_states: the states come from worlds of {sorted(map(str, worlds))} ranks"
        )
    world = int(first["world_size"])
    ranks = sorted(int(s["rank"]) for s in states)
    if ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise InvalidArgument(
            f"merge_states: a sharded job of {world} ranks needs one state of each rank; "
            + (f"missing rank(s) {missing}" if missing else f"got ranks {ranks}")
            + " (one rank's state alone stands for all when every rank took the same batches)"
        )
    consumed = {bytes(s.get("consumed", b"")) for s in states}
    if len(consumed) > 1:
        raise InvalidArgument("merge_states: the states disagree on what earlier worlds took (consumed)")
    length = int(first["length"])
    took = {int(s["rank"]): Bitmap(_taken_bitmap(s)).positions(1 << 62) for s in states}
    merged = dict(first, batch=0, done=b"", rank=0, in_epoch=True)
    merged["consumed"] = rescaled(
        length, consumed.pop(), world, took, int(first["batch_size"]), bool(first["drop_last"])
    )
    return merged
