"""shared mode: every consumer of the job receives the same batches, each built once into one slot.

Per-epoch state, shared by the job's consumers (:class:`SharedEpoch`). Each batch
is an entry::

    PENDING ──(a consumer leased its slot and submitted it)──▶ STARTED ──(finished)──▶ BUILT
       └──────────(no slot free now, or that consumer left)──▶ FAILED: the next consumer starts it again

Whoever needs a STARTED batch first finishes it (waits for the worker, rebuilds it
in a larger slot if it overflowed); the others wait for that. A batch the dataset
failed to build is BUILT as its error: every consumer gets the same error frame.
``consumed[c]`` counts the batches consumer ``c`` has taken into its training loop, ``released[c]``
the batches before which it reads no slot any more (a client releases out of order:
one it keeps goes back after later ones, so releases past that prefix wait in
``_early[c]`` until it closes up). An entry's slot is let go once every consumer
is past it on both: released to the ring, or abandoned (LINGERING) if a consumer's
stream ended while holding it, or detached if a consumer keeps the batch. Nobody
builds beyond ``min(consumed) + window``, so the slowest consumer applies
backpressure within a bounded window; one that leaves stops counting. A new consumer
joining an epoch in progress starts at the slowest consumer's position (the oldest
batch still held), or at its own resume point if that is later. A resuming one (a
reconnect, or a loaded state: it had a position) starts exactly there, even behind
the slowest: the batches it needs that were let go are built again, for it alone,
and the window waits for it (after a server restart, whoever reconnects first must
not move the epoch past the others).

Every method takes the job's condition (``Job.cond``) itself; an entry's ``lock``
is taken without it, and ring leases (a leaf lock) are let go under it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from batchferry.server.builder import Build, Builder, Built
from batchferry.server.jobs import EpochState
from batchferry.server.status import Abort, StreamGone
from batchferry.server.stream import Stream

__all__ = ["SharedBatch", "SharedEpoch", "deliver", "send", "window"]

_POLL = 0.02  # seconds between looks while the slowest consumer holds the window


class _State(enum.Enum):
    PENDING = "pending"
    STARTED = "started"
    BUILT = "built"
    FAILED = "failed"


class _Fate(enum.IntEnum):
    """What happens to a collected entry's slot: the strongest any consumer asked for."""

    RELEASE = 0
    ABANDON = 1
    DETACH = 2


@dataclass(eq=False)
class SharedBatch:
    position: int
    state: _State = _State.PENDING
    build: Build | None = None
    built: Built | None = None
    fate: _Fate = _Fate.RELEASE
    collected: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by whoever finishes it


class SharedEpoch(EpochState):
    def __init__(self, num_batches: int, window: int, cond: threading.Condition) -> None:
        super().__init__(cond)
        self.num_batches = num_batches
        self.window = window
        self.consumed: dict[int, int] = {}
        self.released: dict[int, int] = {}
        self._early: dict[int, set[int]] = {}  # released past the prefix, per consumer
        self._entries: dict[int, SharedBatch] = {}
        self.completed = False  # some consumer received the whole epoch

    @property
    def finished(self) -> bool:
        return self.completed

    @property
    def held(self) -> int:
        """Entries not yet collected (for tests)."""
        with self._cond:
            return len(self._entries)

    def enter(self, consumer: int, start: int, resume: bool = False) -> int:
        """Join at ``start``: exactly there when resuming, else at the slowest consumer's
        position if that is later."""
        with self._cond:
            self.join(consumer)
            first = max(start, min(self.consumed.values())) if self.consumed and not resume else start
            self.consumed[consumer] = self.released[consumer] = first
            self._early[consumer] = set()
            return first

    def may_build(self, position: int) -> bool:
        with self._cond:
            return not self.consumed or position < min(self.consumed.values()) + self.window

    def claim(self, position: int) -> tuple[SharedBatch, bool]:
        """The batch's entry, and True when the caller must start it (then :meth:`publish`)."""
        with self._cond:
            entry = self._entries.get(position)
            if entry is not None and entry.state is not _State.FAILED:
                return entry, False
            entry = self._entries[position] = SharedBatch(position)
            return entry, True

    def publish(self, entry: SharedBatch, build: Build | None) -> None:
        """Record the build the claimer started (None: it could not start one now)."""
        with self._cond:
            if build is None:
                self._fail(entry)
            else:
                entry.build, entry.state = build, _State.STARTED
                if entry.collected:
                    _let_go(entry)
            self._cond.notify_all()

    def publish_built(self, entry: SharedBatch, built: Built | None) -> None:
        """Record a batch the claimer made by other means (None: there is none to make now)."""
        with self._cond:
            if built is None:
                self._fail(entry)
                return
            entry.built, entry.state = built, _State.BUILT
            if entry.collected:
                _let_go(entry)
            self._cond.notify_all()

    def _fail(self, entry: SharedBatch) -> None:
        entry.state, entry.build = _State.FAILED, None
        if self._entries.get(entry.position) is entry:
            del self._entries[entry.position]
        self._cond.notify_all()

    def finish(self, entry: SharedBatch, builder: Builder, stream: Stream) -> Built | None:
        """The built batch; None when it failed and must be claimed again."""
        with self._cond:
            while entry.state is _State.PENDING:
                if not stream.active():
                    raise StreamGone
                self._cond.wait(_POLL)
        while not entry.lock.acquire(timeout=_POLL):
            if not stream.active():
                raise StreamGone
        try:
            if entry.state is _State.BUILT:
                return entry.built
            if entry.state is _State.FAILED or entry.build is None:
                return None
            try:
                built = builder.finish(entry.build)
            except Abort:
                with self._cond:
                    self._fail(entry)
                raise
            except StreamGone:
                with self._cond:
                    self._fail(entry)  # the builder dropped the build; the next consumer starts over
                raise
            with self._cond:
                entry.built, entry.build, entry.state = built, None, _State.BUILT
                if entry.collected:
                    _let_go(entry)
            return built
        finally:
            entry.lock.release()

    def done(self, consumer: int, position: int, fate: _Fate = _Fate.RELEASE) -> None:
        """``consumer`` no longer reads batch ``position``'s slot; ``fate`` says how it let go."""
        with self._cond:
            entry = self._entries.get(position)
            if entry is not None:
                entry.fate = max(entry.fate, fate)
            if consumer in self.released:
                early = self._early[consumer]
                early.add(position)
                while self.released[consumer] in early:
                    early.discard(self.released[consumer])
                    self.released[consumer] += 1
            self._collect()

    def consume(self, consumer: int, upto: int) -> None:
        """``consumer`` has taken every batch before ``upto`` into its loop."""
        with self._cond:
            if consumer in self.consumed and upto > self.consumed[consumer]:
                self.consumed[consumer] = upto
                self._collect()

    def leave(self, consumer: int) -> None:
        with self._cond:
            self.consumed.pop(consumer, None)
            self.released.pop(consumer, None)
            self._early.pop(consumer, None)
            super().leave(consumer)
            self._collect()

    def _collect(self) -> None:
        consumers = self.consumed
        floor = min(min(consumers[c], self.released[c]) for c in consumers) if consumers else None
        # A consumer that holds slots and never releases them holds at most a window of
        # batches taken by all: older ones leave the ring, still mapped by it (see SlotRing).
        taken = min(consumers.values(), default=0) - self.window
        for position in [p for p in self._entries if floor is None or p < max(floor, taken)]:
            entry = self._entries.pop(position)
            entry.collected = True
            if floor is not None and position >= floor:
                entry.fate = max(entry.fate, _Fate.ABANDON)
            _let_go(entry)
        self._cond.notify_all()


def _let_go(entry: SharedBatch) -> None:
    """Give a collected entry's slot back, as its consumers asked (caller holds the job's condition)."""
    if entry.built is not None:
        lease = entry.built.lease
        if entry.fate is _Fate.DETACH:
            lease.detach()
        elif entry.fate is _Fate.ABANDON:
            lease.abandon()
        else:
            lease.release()
        entry.built = None
    elif entry.build is not None:
        build = entry.build  # a worker may still write into it
        build.future.add_done_callback(lambda _f: build.lease.release())
        entry.build = None


@dataclass(frozen=True)
class _SharedHeld:
    """A consumer's hold on a shared batch's slot (what the client releases or keeps)."""

    epoch: SharedEpoch
    consumer: int
    position: int

    def release(self) -> None:
        self.epoch.done(self.consumer, self.position)

    def detach(self) -> None:
        self.epoch.done(self.consumer, self.position, _Fate.DETACH)

    def abandon(self) -> None:
        self.epoch.done(self.consumer, self.position, _Fate.ABANDON)


def window(stream: Stream) -> int:
    """How far a shared epoch builds past its slowest consumer."""
    return max(1, min(2 * stream.plan.credits, stream.ring_slots // 2))


def deliver(
    stream: Stream,
    work: SharedEpoch,
    start_frame: Callable[[int], bytes],
    *,
    ended: Callable[[int], bool],
    claim: Callable[[int], SharedBatch],
) -> Generator[bytes, None, bool]:
    """A consumer's stream of a shared epoch (``work``), in either shared mode: it joins
    the epoch, and is sent each position from where it starts, once the window lets it
    be built and the client has credit, until ``ended(position)``. ``claim(position)``
    gives the position's batch, started by this consumer or found started by another."""
    messages, job, consumer = stream.messages, stream.job, stream.consumer
    assert job is not None and consumer is not None  # the servicer joins job modes
    first = position = work.enter(consumer.id, stream.plan.local_start, stream.plan.resume)
    stream.progress(position)
    # Consumption counts the moment the credit arrives (late joiners start there).
    messages.on_credit.append(lambda taken: work.consume(consumer.id, first + taken))
    yield start_frame(position)
    try:
        while not ended(position):
            if not stream.active() or not messages.open:
                return False
            if not work.may_build(position):
                work.wait(_POLL)  # the slowest consumer holds the window
                continue
            built = work.finish(claim(position), stream.builder, stream)
            if built is None:
                continue  # its builder gave up (built again), or the epoch ended before it
            if not messages.wait_for(position - first, stream.active):
                return False
            yield from stream.frames(built, held=_SharedHeld(work, consumer.id, position))
            position += 1
            stream.progress(position)
        work.completed = True
        return True
    finally:
        work.leave(consumer.id)
        job.prune_epochs()


def send(stream: Stream) -> Generator[bytes, None, bool]:
    plan, builder, job = stream.plan, stream.builder, stream.job
    assert job is not None  # the servicer joins job modes
    total = plan.local_total
    work = job.epoch_state(plan.epoch, lambda: SharedEpoch(total, window(stream), job.cond))
    assert isinstance(work, SharedEpoch)

    def ensure(p: int, wait: bool) -> SharedBatch:
        entry, mine = work.claim(p)
        if mine:
            build = None
            try:
                build = builder.start(plan.batch_index(p), wait=wait)
            finally:
                work.publish(entry, build)
        return entry

    def claim(position: int) -> SharedBatch:
        entry = ensure(position, wait=True)
        for ahead in range(position + 1, min(position + 1 + plan.credits, total)):
            if work.may_build(ahead):
                ensure(ahead, wait=False)
        return entry

    return (yield from deliver(stream, work, stream.start_frame, ended=lambda p: p >= total, claim=claim))
