"""dynamic mode: each batch of an epoch goes to exactly one consumer of the job, first come first served.

Per-epoch state, shared by the job's consumers (:class:`DynamicEpoch`), a ledger
of each batch::

    NEW -> TAKEN(by c) -> DONE            (c took it into its training loop: a credit)
    TAKEN(by c) -> NEW, front of queue    (c left or died before that)
    RESERVED(for token u) -> DONE         (u came back and took it before: its ``taken`` bitmap)
    RESERVED(for token u) -> NEW          (u came back without it, or not within ``rejoin_s``)

A consumer is known by its loader's token (``OpenStream.consumer``) across streams
and server restarts. With a journal (``state_dir``, :mod:`batchferry.server.journal`),
a restarted server reads back which batches each token held and reserves them for
it. A resuming consumer with a token the epoch never saw, arriving while nobody is
in it, is a job restarted from a checkpoint: every batch handed out is RESERVED for
whichever loaded state claims it (see :meth:`DynamicEpoch._checkpoint`).

An epoch remembers every token it has seen (the journal keeps them too), so it
takes at most ``MAX_EPOCH_TOKENS`` loaders; one more is refused (RESOURCE_EXHAUSTED).

The epoch is finished when every batch is DONE; a consumer with nothing to take
waits while others still hold batches that might come back. Every method takes
the job's condition (``Job.cond``) itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Generator

import grpc
import numpy as np

from batchferry.server.jobs import EpochState
from batchferry.server.journal import EpochRecord, Journal
from batchferry.server.status import Abort
from batchferry.server.stream import Stream

__all__ = ["DynamicEpoch", "send"]

log = logging.getLogger("batchferry.server")

_POLL = 0.02  # seconds between looks while other consumers hold the work
_NEW, _TAKEN, _RESERVED, _DONE = range(4)  # a batch's state in the ledger
MAX_EPOCH_TOKENS = 4096  # loaders one epoch of a job takes: a job of 1024 ranks, restarted 3 times
ANYONE_TOKEN = b""  # reservations after a checkpoint restart: for whichever consumer took them


class DynamicEpoch(EpochState):
    def __init__(
        self,
        num_batches: int,
        cond: threading.Condition,
        *,
        epoch: int = 0,
        journal: Journal | None = None,
        rejoin_s: float = 5.0,
    ) -> None:
        super().__init__(cond)
        self.num_batches = num_batches
        self._epoch, self._journal, self._rejoin_s = epoch, journal, rejoin_s
        self._state = np.full(num_batches, _NEW, dtype=np.int8)
        self._next = 0
        self._returned: deque[int] = deque()  # NEW again, before those never handed out
        self._taken: dict[int, set[int]] = {}  # TAKEN: by consumer
        self._acked: dict[int, set[int]] = {}  # DONE by a consumer still in the epoch
        self._tokens: dict[int, bytes] = {}  # consumer -> its token
        self._reserved: dict[bytes, set[int]] = {}  # RESERVED: for a token (ANYONE: b"")
        self._seen: set[bytes] = set()  # tokens handed a batch of this epoch
        self._deadline: float | None = None  # when reservations go back to the queue
        self.done = 0
        record = journal.take(epoch, num_batches) if journal is not None else None
        if journal is not None:
            journal.begin(epoch, num_batches)
        if record is not None:
            self._restore(record)

    def _restore(self, record: EpochRecord) -> None:
        """The ledger a journal kept through a restart: what consumers held is reserved for them."""
        for p in record.done:
            self._state[p] = _DONE
        self.done = len(record.done)
        for p, token in record.holder.items():
            self._state[p] = _RESERVED
            self._reserved.setdefault(bytes.fromhex(token), set()).add(p)
        self._seen = {bytes.fromhex(t) for t in record.tokens}
        if self._reserved:
            self._deadline = time.monotonic() + self._rejoin_s

    @property
    def finished(self) -> bool:
        with self._cond:
            return self.done >= self.num_batches

    def record(self) -> EpochRecord:
        """This ledger as the journal keeps it: a live consumer's done batches are still
        held by its token (its ``taken`` bitmap says which were done, if it comes back)."""
        with self._cond:
            holder: dict[int, str] = {}
            for c, positions in [*self._taken.items(), *self._acked.items()]:
                holder.update(dict.fromkeys(positions, self._tokens[c].hex()))
            for token, positions in self._reserved.items():
                holder.update(dict.fromkeys(positions, token.hex()))
            final = set(np.flatnonzero(self._state == _DONE).tolist()) - set(holder)
            return EpochRecord(self.num_batches, holder, final, {t.hex() for t in self._seen})

    def enter(self, consumer: int, token: bytes, positions: np.ndarray, resume: bool) -> None:
        """``consumer`` (``token``) joins, having taken ``positions`` before (from an earlier
        stream, a server that has restarted since, or a loaded state)."""
        with self._cond:
            if token not in self._seen and len(self._seen) >= MAX_EPOCH_TOKENS:
                raise Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"epoch {self._epoch} of this dynamic job has had {MAX_EPOCH_TOKENS} loaders, the "
                    "most one epoch takes; give this loader another job name, or begin the next epoch",
                )
            alone = not self.members
            self.join(consumer)
            self._tokens[consumer] = token
            self._taken.setdefault(consumer, set())
            acked = self._acked.setdefault(consumer, set())
            # A consumer continuing a position (a loaded state: perhaps one with nothing
            # taken) that the epoch has never seen, arriving to an empty epoch with a past:
            # the job restarted from a checkpoint.
            if resume and alone and token not in self._seen and self._history():
                self._checkpoint()
            taken = {int(p) for p in positions}
            mine = self._reserved.pop(token, set())
            self._queue(sorted(mine - taken))
            # This consumer's earlier stream, not yet ended here, had sent it some of them.
            for c, sent in self._taken.items():
                if c != consumer and self._tokens.get(c) == token:
                    mine |= sent & taken
                    sent.difference_update(taken)
            adopted = []
            for p in sorted(taken):
                state = self._state[p]
                if p not in mine and state in (_TAKEN, _DONE):
                    continue  # another consumer has it, or it was done before this one came back
                if state == _RESERVED:
                    for held in self._reserved.values():
                        held.discard(p)
                if state != _DONE:
                    self.done += 1
                self._state[p] = _DONE
                acked.add(p)
                if p not in mine:
                    adopted.append(p)
            if self._journal is not None and adopted:
                self._journal.handed(self._epoch, adopted, token)
            self._seen.add(token)
            self._cond.notify_all()

    def _history(self) -> bool:
        return bool(self._next) or bool((self._state != _NEW).any())

    def _checkpoint(self) -> None:
        """The job restarted from a checkpoint: its consumers' loaded states, not this
        ledger, say which batches were taken. Every batch handed out is held back for
        them (the first to arrive must not get one that a later one took) until the
        grace period ends."""
        held = np.flatnonzero(self._state != _NEW).tolist()
        self._state[held] = _RESERVED
        self._reserved = {ANYONE_TOKEN: set(held)}
        self.done = 0
        self._acked = {c: set() for c in self._acked}
        self._deadline = time.monotonic() + self._rejoin_s
        if self._journal is not None:
            self._journal.reset(self._epoch)
        log.info(
            "epoch %d: resumed from a checkpoint; %d batch(es) held for its consumers", self._epoch, len(held)
        )

    def _queue(self, positions: list[int]) -> None:
        """Back to the queue, ahead of those never handed out."""
        self._state[positions] = _NEW
        self._returned.extend(positions)
        if self._journal is not None:
            self._journal.back(self._epoch, positions)

    def _expire(self) -> None:
        """Reservations nobody came back for within ``rejoin_s`` go to whoever asks."""
        if self._deadline is None or time.monotonic() < self._deadline:
            return
        self._deadline = None
        lost = sorted(p for positions in self._reserved.values() for p in positions)
        self._reserved.clear()
        if lost:
            self._queue(lost)
            log.info(
                "epoch %d: %d batch(es) of consumers that did not come back go to others",
                self._epoch,
                len(lost),
            )

    def take(self, consumer: int) -> int | None:
        """A batch for ``consumer``, or None when none is free now."""
        with self._cond:
            self._expire()
            index = None
            while self._returned and index is None:
                p = self._returned.popleft()
                index = p if self._state[p] == _NEW else None
            while index is None and self._next < self.num_batches:
                p, self._next = self._next, self._next + 1
                index = p if self._state[p] == _NEW else None
            if index is None:
                return None
            self._state[index] = _TAKEN
            self._taken[consumer].add(index)
            if self._journal is not None:
                self._journal.handed(self._epoch, [index], self._tokens[consumer])
            return index

    def give_back(self, consumer: int, index: int) -> None:
        with self._cond:
            if index in self._taken.get(consumer, set()):
                self._taken[consumer].discard(index)
                self._state[index] = _NEW
                self._returned.appendleft(index)
                if self._journal is not None:
                    self._journal.back(self._epoch, [index])
                self._cond.notify_all()

    def ack(self, consumer: int, index: int) -> None:
        with self._cond:
            taken = self._taken.get(consumer, set())
            if index in taken:
                taken.discard(index)
                self._state[index] = _DONE
                self._acked[consumer].add(index)
                self.done += 1
                self._cond.notify_all()

    def depart(self, consumer: int) -> list[int]:
        """``consumer`` leaves: what it took but never acknowledged goes back to the queue,
        and what it did is done for good (journaled: a restart does not repeat it)."""
        with self._cond:
            lost = sorted(self._taken.pop(consumer, set()))
            self._queue(lost)
            acked = sorted(self._acked.pop(consumer, set()))
            if self._journal is not None:
                self._journal.done(self._epoch, acked)
            self._tokens.pop(consumer, None)
            self.leave(consumer)
            return lost


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, messages, builder = stream.plan, stream.messages, stream.builder
    job, consumer = stream.job, stream.consumer
    assert job is not None and consumer is not None  # the servicer joins job modes
    work = job.epoch_state(
        plan.epoch,
        lambda: DynamicEpoch(
            plan.local_total, job.cond, epoch=plan.epoch, journal=job.journal, rejoin_s=job.rejoin_s
        ),
    )
    assert isinstance(work, DynamicEpoch)
    # A client without a token is a consumer of its own to the ledger (no server life's other).
    token = plan.consumer or f"stream-{consumer.id}-{id(work)}".encode()
    work.enter(consumer.id, token, plan.taken_positions(), plan.resume)
    sent: deque[int] = deque()  # positions sent, not yet taken into the client's loop
    acked = sent_count = 0

    def ack_due() -> None:
        # Each credit beyond the first grant: the client took one more batch into its loop.
        nonlocal acked
        while acked < messages.granted - plan.credits and sent:
            work.ack(consumer.id, sent.popleft())
            acked += 1

    yield stream.start_frame(0)
    try:
        while stream.active() and messages.open:
            ack_due()
            if sent_count >= messages.granted:
                if messages.quiet():
                    return False
                work.wait(_POLL)  # no credit: the client has not taken enough batches yet
                continue
            position = work.take(consumer.id)
            if position is None:
                if work.finished:
                    return True
                work.wait(_POLL)  # others hold batches that may come back
                continue
            try:
                build = builder.start(plan.batch_index(position), wait=True)
                assert build is not None
                built = builder.finish(build)
            except BaseException:
                work.give_back(consumer.id, position)
                raise
            yield from stream.frames(built)
            sent.append(position)
            sent_count += 1
            consumer.sent += 1
        return False
    finally:
        ack_due()  # acknowledgements that arrived with the client's goodbye still count
        lost = work.depart(consumer.id)
        if lost:
            log.info("job %r: %d batch(es) of a departed consumer go to others", job.name, len(lost))
        job.prune_epochs()
