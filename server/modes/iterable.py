"""IterableDataset streams (independent and sharded modes): torch's round robin over N iterators.

The stream's N iterators (the loader's ``num_workers``, one for 0) are hosted in the
pool's processes (:mod:`batchferry.server.iterators`). As torch's DataLoader hands
its workers tasks, steps go to the iterators in turn, skipping those known to be
exhausted, up to a build window ahead; results are taken in the order the steps were
given. A step that finds its iterator exhausted is dropped and the iterator leaves
the rotation; every other result is the next batch of the epoch, numbered as it is
sent. So the epoch is torch's: batch k of iterator i comes where torch's loader
yields it, whatever the window. A step the dataset fails is that batch's error
frame (the iterator then goes on, or, a generator, ends, as in torch). An iterator
whose process died ends the stream with a DatasetError saying so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator

import grpc

from batchferry.server import framing
from batchferry.server.builder import Build, Builder, Built
from batchferry.server.iterators import IterStep
from batchferry.server.plan import Plan
from batchferry.server.status import Abort
from batchferry.server.stream import Stream

__all__ = ["Steps", "send"]


class Steps:
    """The next step of each of a stream's iterators, given in torch's round robin."""

    def __init__(self, plan: Plan, key: tuple[int, int], rank: int, world_size: int) -> None:
        self._plan, self._key = plan, key
        self._rank, self._world_size = rank, world_size
        self.count = max(1, plan.num_iterators)
        self.given = [0] * self.count  # steps given to each iterator
        self.ended = [False] * self.count
        self.turn = plan.next_iterator

    def next(self) -> IterStep | None:
        """The next step, in turn among the iterators not yet exhausted (None: all are)."""
        for k in range(self.count):
            i = (self.turn + k) % self.count
            if not self.ended[i]:
                self.turn = (i + 1) % self.count
                return self._step(i)
        return None

    def undo(self, step: IterStep) -> None:
        """A step that could not be given now: give it again next."""
        self.given[step.iterator] -= 1
        self.turn = step.iterator

    def _step(self, i: int) -> IterStep:
        plan = self._plan
        step, self.given[i] = self.given[i], self.given[i] + 1
        taken, state = plan.places[i] if plan.places and step == 0 else (0, b"")
        return IterStep(
            key=self._key,
            iterator=i,
            step=step,
            num_workers=plan.num_iterators,
            base_seed=plan.base_seed,
            rank=self._rank,
            world_size=self._world_size,
            batch_size=None if plan.unbatched else plan.batch_size,
            drop_last=plan.drop_last,
            skip=0 if state else taken,
            state=state,
        )


def hosting(ticket: tuple[int, int]) -> tuple[int, int]:
    """A pool ticket, which names iterators in the worker processes ((0, 0): none was free)."""
    if ticket == (0, 0):
        raise Abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too many streams are open on this server to host another IterableDataset stream's iterators",
        )
    return ticket


def next_built(builder: Builder, steps: Steps, pending: list[Build], window: int) -> Built | None:
    """The iterators' next batch, in torch's round robin, with up to ``window`` steps kept
    in flight in ``pending`` (oldest first); None once every iterator is exhausted."""
    while True:
        while len(pending) < window:
            step = steps.next()
            if step is None:
                break
            build = builder.start_step(step, wait=not pending)
            if build is None:
                steps.undo(step)
                break
            pending.append(build)
        if not pending:
            return None
        built = builder.finish(pending.pop(0))
        if not built.exhausted:
            return built
        steps.ended[built.iterator] = True


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, messages, builder = stream.plan, stream.messages, stream.builder
    sharded = plan.settings is not None
    steps = Steps(
        plan, hosting(builder.ticket), plan.rank if sharded else 0, plan.world_size if sharded else 1
    )
    pending: list[Build] = []  # in the order the steps were given
    position = plan.start_batch  # the epoch's next batch index
    sent = 0
    yield framing.start_frame(0, stream.order, position)
    try:
        while True:
            window = stream.build_window(min(messages.granted - sent, plan.credits))
            built = next_built(builder, steps, pending, window)
            if built is None:
                return True  # every iterator is exhausted
            built = dataclasses.replace(built, index=position)
            if not (yield from stream.send(built, sent)):
                return False
            sent += 1
            position += 1
            stream.progress(position)
    finally:
        for build in pending:
            builder.drop(build)
