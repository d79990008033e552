"""independent and sharded modes: this stream's batches, in order, built ahead within the credit window.

The order is the plan's (torch's RandomSampler order, or DistributedSampler's shard
for this rank). Builds run up to one credit window beyond what the client has
granted (within the stream's share of the ring), so they overlap the credit round
trip; sends never exceed the grant. A stream blocks for a slot only while it has no
build in flight: it never waits on itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator

from batchferry.server.builder import Build
from batchferry.server.stream import Stream

__all__ = ["send"]


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, messages, builder = stream.plan, stream.messages, stream.builder
    pending: deque[Build] = deque()
    start, total = plan.local_start, plan.local_total
    next_build = next_send = start
    yield stream.start_frame(start)
    try:
        while next_send < total:
            # Never more than one credit window granted ahead, whatever the client grants,
            # nor more builds in flight than this stream's share of the ring.
            granted = min(messages.granted - (next_send - start), plan.credits)
            window = min(granted + plan.credits, max(1, stream.share()))
            while next_build < total and next_build - next_send < window:
                build = builder.start(plan.batch_index(next_build), wait=not pending)
                if build is None:
                    break
                pending.append(build)
                next_build += 1
            grown = builder.min_bytes
            built = builder.finish(pending.popleft())
            if builder.min_bytes > grown:
                # The batch outgrew its slot: builds made ahead in slots that small
                # would too. Start them again at the new size.
                while pending:
                    builder.drop(pending.pop())
                next_build = next_send + 1
            if not messages.wait_for(next_send - start, stream.active):
                built.lease.release()
                return False
            yield from stream.frames(built)
            next_send += 1
            stream.progress(next_send)
        return True
    finally:
        for build in pending:
            builder.drop(build)
