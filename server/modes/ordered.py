"""independent and sharded modes: this stream's batches, built ahead within the credit window.

The order is the plan's (torch's RandomSampler order, or DistributedSampler's shard
for this rank). Builds run ahead of what the client has granted by a credit window
or the pool's worker count, whichever is larger (within the stream's share of the
ring), so they overlap the credit round trip and use every worker; sends never
exceed the grant. A stream blocks for a slot only while it has no
build in flight: it never waits on itself.

Batches go out in epoch order, or with ``any_order`` as soon as each is built (a
slow batch then holds up no other); positions the client already has (``taken``,
after a reconnect) are skipped. Small batches are built and sent in groups of
consecutive positions (:class:`~batchferry.server.stream.GroupSize`); credits
count frames, so a group takes one. A batch the dataset fails to build goes out in
its place as an error frame, and the stream goes on.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from batchferry.server.builder import Build
from batchferry.server.stream import Stream

__all__ = ["send"]


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, messages, builder = stream.plan, stream.messages, stream.builder
    skip = np.zeros(max(plan.local_total, 0), dtype=bool)
    skip[plan.taken_positions()] = True

    def after(position: int) -> int:
        """The first position at or after ``position`` still to send."""
        while position < plan.local_total and skip[position]:
            position += 1
        return position

    def group_from(position: int) -> list[int]:
        """The positions of the next group: up to the group size, from ``position`` on."""
        positions: list[int] = []
        size = stream.group()
        while position < plan.local_total and len(positions) < size:
            positions.append(position)
            position = after(position + 1)
        return positions

    def start(positions: list[int], wait: bool) -> Build | None:
        first, *more = (plan.batch_index(p) for p in positions)
        return builder.start(first, wait=wait, more=tuple(more), batch_bytes=stream.group.batch_bytes)

    pending: list[tuple[list[int], Build]] = []  # (positions, build), in position order
    redo: list[list[int]] = []  # any_order: the rest of groups cut short, built first
    next_build = after(plan.local_start)
    sent = 0  # frames
    batches = 0
    yield stream.start_frame(plan.local_start)
    try:
        while next_build < plan.local_total or pending or redo:
            granted = min(messages.granted - sent, plan.credits)
            window = stream.build_window(granted)
            while (redo or next_build < plan.local_total) and len(pending) < window:
                positions = redo[0] if redo else group_from(next_build)
                build = start(positions, wait=not pending)
                if build is None:
                    break
                pending.append((positions, build))
                if redo:
                    redo.pop(0)
                else:
                    next_build = after(positions[-1] + 1)
            positions, built, grew = stream.next_built(pending)
            rest = positions[built.count :]
            if rest and plan.any_order:
                # A later batch of the group overflowed or failed: build it and those after
                # it again, next (a batch that fails first in its build comes as its error).
                redo.append(rest)
            elif (rest or grew) and not plan.any_order:
                # A batch outgrew its slot: builds made ahead in slots that small would too.
                # Start them again at the new size, from the first batch not built.
                for _, ahead in pending:
                    builder.drop(ahead)
                pending.clear()
                next_build = rest[0] if rest else after(positions[-1] + 1)
            if not (yield from stream.send(built, sent)):
                return False
            sent += 1
            batches += built.count
            stream.progress(plan.local_start + batches)
        return True
    finally:
        for _, build in pending:
            builder.drop(build)
