"""One StreamBatches call's working set, as the mode senders see it.

A sender (``server/modes/``) is a generator of frames over a :class:`Stream`: it
sends the start frame, then batches as credits allow, and returns True when it
sent every batch of its part of the epoch (the servicer then sends the end frame
and waits for the client's releases), or False when the client stopped early.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from batchferry.sampling import EpochOrder

from . import compression, framing
from .builder import Build, Builder, Built, first_built
from .credits import ClientMessages, Held
from .jobs import Consumer, Job
from .plan import Plan

__all__ = ["GroupHistory", "GroupSize", "Sender", "Stream"]

_HOLD_MARGIN = 4  # slots a same-host client may hold beyond its credits
_T = TypeVar("_T")


class GroupSize:
    """How many consecutive small batches to build and send as one group (one worker task,
    slot, frame, credit and release): enough to share those per-frame costs, which are
    about a millisecond of CPU, few enough that a group stays within ``max_bytes`` and
    quick to build. A stream's first batch goes alone, so it comes no later than without
    groups. Later batches go one at a time until their size and build time are known,
    from this stream's builds or, with ``seed``, from an earlier stream of the same
    batches (:class:`GroupHistory`).
    """

    MAX_BATCHES = 64
    MAX_SECONDS = 0.005  # a worker's time to build one group: the latency it adds
    RECENT = 16  # builds whose largest batch sizes the next groups

    def __init__(self, max_bytes: int, seed: tuple[int, float] | None = None) -> None:
        self._max_bytes = max_bytes
        self._largest: deque[int] = deque(maxlen=self.RECENT)  # of each recent build
        self._seconds = 0.0  # per batch: a moving average
        self._first = True
        self._seeded = seed is not None  # until this stream's own first build replaces it
        if seed is not None:
            self._largest.append(seed[0])
            self._seconds = seed[1]

    def observe(self, built: Built) -> None:
        if built.error is not None:  # built nothing: says nothing of sizes or times
            return
        if self._seeded:  # sizes: this stream's own replace the seed's; times: averaged in
            self._seeded = False
            self._largest.clear()
        self._largest.append(built.largest_bytes)
        seconds = built.seconds / built.count
        self._seconds = seconds if not self._seconds else 0.8 * self._seconds + 0.2 * seconds

    @property
    def batch_bytes(self) -> int:
        """Room for each batch of a group: the largest of the recent builds (a rare large
        batch passes; the slot then holds one batch that large besides, see Builder)."""
        return max(self._largest, default=0)

    def state(self) -> tuple[int, float] | None:
        """What a later stream of the same batches starts from: this stream's own builds
        (None when it saw none, so an estimate is never passed on unconfirmed)."""
        if self._seeded or not self._largest or not self._seconds:
            return None
        return self.batch_bytes, self._seconds

    def __call__(self) -> int:
        first, self._first = self._first, False
        if first or not self._largest or self._max_bytes <= 0:
            return 1
        by_time = self.MAX_SECONDS / self._seconds if self._seconds else self.MAX_BATCHES
        return max(1, min(self.MAX_BATCHES, self._max_bytes // max(1, self.batch_bytes), int(by_time)))


class GroupHistory:
    """The last group estimate per (dataset, collate, batch size, client-chosen batches), so that a stream of
    batches served before (the next epoch, a reconnect, another trainer) builds groups
    from its second build on. Shared by the server's streams; at most ``size`` entries."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str, int, bool], tuple[int, float]] = OrderedDict()

    def get(self, key: tuple[str, str, int, bool]) -> tuple[int, float] | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: tuple[str, str, int, bool], state: tuple[int, float] | None) -> None:
        if state is None:
            return
        with self._lock:
            self._entries[key] = state
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


@dataclass
class Stream:
    plan: Plan
    order: EpochOrder
    messages: ClientMessages
    builder: Builder
    active: Callable[[], bool]
    ring_slots: int = 8
    # The pool's workers: builds run this far ahead of the grant (when the ring allows),
    # so a stream with few credits still keeps every worker busy.
    workers: int = 1
    # This stream's fair share of the ring's slots now (they are split among open streams).
    share: Callable[[], int] = lambda: 1 << 30
    # Slots a same-host client may hold now: few enough that, all streams holding theirs,
    # every stream still finds a slot to build in (so holders cannot starve the ring).
    hold_share: Callable[[int], int] = lambda _bytes: 1 << 30
    # Batches per group in the modes that build groups (independent and sharded).
    group: GroupSize = field(default_factory=lambda: GroupSize(0))
    # Which byte-stream batches try compression (server/compression.py).
    trials: compression.Trials = field(default_factory=compression.Trials)
    job: Job | None = None
    consumer: Consumer | None = None
    # Sees each batch's frames go out, with the transport that carries them (server/metrics.py).
    observe: Callable[[Iterator[bytes], str, Built], Iterator[bytes]] = lambda frames, _t, _b: frames

    def build_window(self, granted: int) -> int:
        """Builds this stream may have in flight: the grant, plus enough ahead of it to
        cover the credit round trip and keep the workers busy, within its ring share."""
        return min(granted + max(self.plan.credits, self.workers), max(1, self.share()))

    def start_frame(self, position: int) -> bytes:
        """The start frame, naming the first batch this stream sends (its ``position``-th)."""
        return framing.start_frame(self.plan.num_batches, self.order, self.plan.batch_index(position))

    def frames(self, built: Built, held: Held | None = None) -> Iterator[bytes]:
        """Frames for a built batch. Same host: the client holds the slot through ``held``
        (the lease itself by default) until it releases it. Byte stream: the bytes are
        copied out and ``held`` is released at once.

        A same-host client holding more slots than a reading loop needs (its credits,
        plus the few batches a loop keeps), or than its hold share of the ring, gets the
        bytes instead: it cannot starve the ring by never letting go. What it already
        holds above its share the ring may reclaim for a stream that waits (ring.py).

        A batch that failed is one error frame on either transport; ``held`` is released
        once it is out (the client has no slot to release).
        """
        held = held or built.lease
        self.messages.sending(built.count)
        if built.error is not None:
            transport = "shm" if self.plan.shm else "grpc"
            return self.observe(framing.error_frames(built, held.release), transport, built)
        held_now = self.messages.held
        if (
            self.plan.shm
            and held_now < self.plan.credits + _HOLD_MARGIN
            and held_now < self.hold_share(built.lease.capacity)  # asks the ring: last
        ):
            if held is built.lease:  # this stream's own slot: the ring may reclaim it
                built.lease.hold()
            self.messages.hold(built.index, held)
            return self.observe(iter([framing.shm_frame(built)]), "shm", built)
        frames = framing.byte_frames(built, self.plan.chunk_bytes, held.release, self.plan.codec, self.trials)
        return self.observe(frames, "grpc", built)

    def send(self, built: Built, sent: int) -> Generator[bytes, None, bool]:
        """Frames for ``built`` once the client has granted frame number ``sent`` (False, with
        the slot given back, when the client stopped or left first)."""
        if not self.messages.wait_for(sent, self.active):
            built.lease.release()
            return False
        yield from self.frames(built)
        return True

    def next_built(self, pending: list[tuple[_T, Build]]) -> tuple[_T, Built, bool]:
        """Finish the next of ``pending`` (the oldest; with ``any_order`` the first a worker is
        done with): its key, what was built, and whether a batch outgrew its slot meanwhile
        (builds started ahead in slots that small would outgrow theirs too)."""
        key, build = pending.pop(0) if not self.plan.any_order else first_built(pending, self.active)
        grown = self.builder.min_bytes
        built = self.builder.finish(build)
        self.group.observe(built)
        return key, built, self.builder.min_bytes > grown

    def progress(self, position: int) -> None:
        """For listings: this consumer has been sent its batches before ``position``."""
        if self.consumer is not None:
            self.consumer.sent = position


Sender = Callable[[Stream], Generator[bytes, None, bool]]
