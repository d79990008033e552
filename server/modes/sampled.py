"""Batches the client chooses: its own sampler runs in the trainer, the server builds what it is told.

The client sends the sample indices of its next batches (``BatchIndices``, a credit
window ahead of need) and, when its sampler is exhausted, how many batches the
epoch had. This replica builds and sends the batches it owns (b % R == replica),
in the order given (or as built, with ``any_order``); small batches several to a
group, from what has arrived. Every list is checked before anything is built: batch
indices increasing and this replica's, sample indices within the dataset, batches of
at most ``MAX_BATCH`` samples (one sample without batching).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator

import numpy as np

from batchferry.server.builder import Build
from batchferry.server.plan import Plan
from batchferry.server.status import invalid
from batchferry.server.stream import Stream
from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["MAX_BATCH", "send", "unpack"]

MAX_BATCH = 1 << 20  # samples in one batch the client chooses
_Batches = list[tuple[int, np.ndarray]]  # (batch index, samples) pairs


def unpack(
    lists: _pb2.BatchIndices, plan: Plan, after: int
) -> tuple[list[tuple[int, np.ndarray]], int | None]:
    """The (batch index, samples) pairs of a message, checked; and the epoch's total if it ends.

    ``after``: the last batch index received before (-1 for none).
    """
    index = np.asarray(lists.index, dtype=np.int64)
    lengths = np.asarray(lists.lengths, dtype=np.int64)
    samples = np.asarray(lists.samples, dtype=np.int64)
    if index.size != lengths.size:
        raise invalid(f"batches: {index.size} batch indices but {lengths.size} lengths")
    most = 1 if plan.unbatched else MAX_BATCH
    if index.size and (lengths.min() < 1 or lengths.max() > most):
        raise invalid(f"batches: every batch needs 1 to {most} samples")
    if int(lengths.sum()) != samples.size:
        raise invalid(f"batches: lengths add up to {int(lengths.sum())}, but {samples.size} samples came")
    if samples.size and (samples.min() < 0 or samples.max() >= plan.length):
        bad = int(samples[(samples < 0) | (samples >= plan.length)][0])
        raise invalid(f"batches: sample index {bad} is outside the dataset (length {plan.length})")
    previous = np.concatenate([[after], index[:-1]]) if index.size else index
    if index.size and (np.any(index <= previous) or np.any(index % plan.replicas != plan.replica)):
        raise invalid(
            f"batches: batch indices must increase and be this replica's (b % {plan.replicas} == "
            f"{plan.replica}), after batch {after}; got {index[:8].tolist()}"
        )
    total = None
    if lists.end:
        last = int(index[-1]) if index.size else after
        if lists.total <= last:
            raise invalid(f"batches: the epoch ends with {lists.total} batches, but batch {last} was sent")
        total = int(lists.total)
    parts = np.split(samples, np.cumsum(lengths)[:-1]) if index.size else []
    pairs = list(zip(index.tolist(), parts, strict=True))
    return pairs, total


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, messages, builder = stream.plan, stream.messages, stream.builder
    waiting: deque[tuple[int, np.ndarray]] = deque()  # received, not yet building
    pending: list[tuple[_Batches, Build]] = []  # (the batches of a group, its build)
    last, total = plan.start_batch - 1, None
    sent = 0  # frames
    batches = 0
    yield stream.start_frame(plan.local_start)
    try:
        while True:
            for lists in messages.take_lists():
                if total is not None:
                    raise invalid("batches: more index lists after the end of the epoch")
                pairs, total = unpack(lists, plan, last)
                waiting.extend(pairs)
                last = pairs[-1][0] if pairs else last
            granted = min(messages.granted - sent, plan.credits)
            window = stream.build_window(granted)
            while waiting and len(pending) < window:
                # A group of what has come (small batches; never waiting for more to fill one).
                group = [waiting[k] for k in range(min(stream.group(), len(waiting)))]
                build = builder.start_lists(group, not pending, stream.group.batch_bytes)
                if build is None:
                    break
                for _ in group:
                    waiting.popleft()
                pending.append((group, build))
            if not pending:
                if total is not None and not waiting:
                    return True
                if not messages.wait_lists(stream.active):
                    return False
                continue
            group, built, grew = stream.next_built(pending)
            rest = group[built.count :]
            if rest and plan.any_order:
                # A later batch of the group overflowed or failed: build it and those after
                # it again, next (a batch that fails first in its build comes as its error).
                waiting.extendleft(reversed(rest))
            elif (rest or grew) and not plan.any_order:
                # A batch outgrew its slot: builds made ahead in slots that small would too.
                # Build them again at the new size, from the first batch not built.
                for ahead, dropped in reversed(pending):
                    builder.drop(dropped)
                    waiting.extendleft(reversed(ahead))
                pending.clear()
                waiting.extendleft(reversed(rest))
            if not (yield from stream.send(built, sent)):
                return False
            sent += 1
            batches += built.count
            stream.progress(batches)
    finally:
        for _, build in pending:
            builder.drop(build)
