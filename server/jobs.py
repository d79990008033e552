"""Jobs: named groups of consumers sharing one dataset in sharded, shared or dynamic mode.

A job is created by its first consumer, which fixes its settings; later
consumers must agree (else FAILED_PRECONDITION naming the field). A job that every
consumer has left may come back in another world size (a resized job resuming): it
takes the new size and remembers the sizes it ran in. It ends when
it has had no consumer for ``idle_s`` seconds.

Shared and dynamic jobs coordinate each epoch through an :class:`EpochState`
(``server/modes/``), kept while a consumer is in it and pruned after: a state
nobody is in goes once it is finished or two epochs old, and a job never keeps
more than ``MAX_EPOCH_STATES``.

A dynamic job of a server with a ``state_dir`` keeps a journal of its epochs'
ledgers (``server/journal.py``), compacted whenever epochs are pruned and removed
with the job.

Lock order: ``JobRegistry._lock`` before ``Job.cond`` (a reentrant condition that
every epoch state of the job shares).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

from batchferry.v1 import loader_pb2 as _pb2

from .journal import EpochRecord, Journal, StateDir

__all__ = [
    "MAX_EPOCH_STATES",
    "Consumer",
    "EpochState",
    "Job",
    "JobConflict",
    "JobRegistry",
    "JobSettings",
    "TooManyJobs",
]

MAX_EPOCH_STATES = 8
MAX_RESIZES = 16  # world sizes a job remembers (listings show them)


class JobConflict(Exception):
    """A consumer's settings disagree with its job's."""


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    mode: _pb2.Mode
    dataset: str
    batch_size: int
    shuffle: bool
    drop_last: bool
    collate: str
    seed: int
    world_size: int
    unbatched: bool = False
    num_iterators: int = 0  # an IterableDataset's iterators (the loaders' num_workers)


@dataclass
class Consumer:
    id: int
    peer: str
    rank: int
    epoch: int
    sent: int = 0
    total: int = 0
    taken: int = 0  # batches the consumer has taken into its training loop


class EpochState:
    """One epoch of a shared or dynamic job, as its consumers see it (``server/modes/``)."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self.members: set[int] = set()

    @property
    def finished(self) -> bool:
        return False

    def join(self, consumer: int) -> None:
        with self._cond:
            self.members.add(consumer)

    def leave(self, consumer: int) -> None:
        with self._cond:
            self.members.discard(consumer)
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def close(self) -> None:
        """The state is forgotten: let go of what it holds beyond its consumers' streams."""

    def record(self) -> EpochRecord | None:
        """What the job's journal keeps of this epoch (None: nothing)."""
        return None


@dataclass
class Job:
    name: str
    settings: JobSettings
    consumers: dict[int, Consumer] = field(default_factory=dict)
    batches_built: int = 0
    idle_since: float | None = None
    cond: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))
    epochs: dict[int, EpochState] = field(default_factory=dict)
    # The world sizes the job has run in, each with the epoch it began in (at most MAX_RESIZES).
    worlds: list[tuple[int, int]] = field(default_factory=list)
    resizes: int = 0  # all of them: ``worlds`` keeps the last few
    epoch: int = 0  # the newest epoch a consumer has opened
    journal: Journal | None = None
    rejoin_s: float = 5.0  # after a restart: how long a consumer's batches wait for it

    def resize(self, world_size: int, epoch: int) -> None:
        """Every consumer left, and the job comes back with ``world_size`` ranks."""
        self.settings = replace(self.settings, world_size=world_size)
        self.resizes += 1
        self.worlds = [*self.worlds, (world_size, epoch)][-MAX_RESIZES:]

    def epoch_state(self, epoch: int, make: Callable[[], EpochState]) -> EpochState:
        """Epoch ``epoch``'s state, made by its first consumer."""
        with self.cond:
            state = self.epochs.get(epoch)
            if state is None:
                state = self.epochs[epoch] = make()
            return state

    def prune_epochs(self) -> None:
        """Forget epoch states nobody is in that are finished, two epochs old, or too many."""
        with self.cond:
            newest = max(self.epochs, default=0)
            idle = sorted(e for e, s in self.epochs.items() if not s.members)
            pruned = False
            for epoch in idle:
                state = self.epochs[epoch]
                if state.finished or epoch < newest - 1 or len(self.epochs) > MAX_EPOCH_STATES:
                    del self.epochs[epoch]
                    state.close()
                    pruned = True
            if pruned and self.journal is not None:
                self.journal.compact(self.records())

    def records(self) -> dict[int, EpochRecord]:
        """The ledgers of the epochs kept, as the journal keeps them."""
        with self.cond:
            kept = {e: s.record() for e, s in self.epochs.items()}
            return {e: r for e, r in kept.items() if r is not None}

    def close(self) -> None:
        """The job is forgotten: so are its epoch states."""
        with self.cond:
            states, self.epochs = list(self.epochs.values()), {}
        for state in states:
            state.close()


class TooManyJobs(Exception):
    """Every one of ``max_jobs`` jobs has consumers: a new job name cannot be taken in."""


class JobRegistry:
    """Jobs by name. The one place their number is bounded (``max_jobs``): a new job
    evicts the longest-idle job when the registry is full, and is refused when none is
    idle, so job names (and their metric series) cannot grow without bound."""

    def __init__(
        self,
        idle_s: float = 300.0,
        max_jobs: int = 256,
        state: StateDir | None = None,
        rejoin_s: float = 5.0,
    ) -> None:
        self.idle_s = idle_s
        self.max_jobs = max_jobs
        self._state = state  # dynamic jobs' journals
        self._rejoin_s = rejoin_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def join(
        self, name: str, settings: JobSettings, peer: str, rank: int, epoch: int
    ) -> tuple[Job, Consumer]:
        with self._lock:
            self._expire()
            job = self._jobs.get(name)
            if job is None:
                self._make_room(name)
                journal = None
                if self._state is not None and settings.mode == _pb2.MODE_DYNAMIC:
                    journal = self._state.open(name, settings, MAX_EPOCH_STATES)
                job = self._jobs[name] = Job(
                    name,
                    settings,
                    worlds=[(settings.world_size, epoch)],
                    journal=journal,
                    rejoin_s=self._rejoin_s,
                )
                if journal is not None:
                    journal.live = job.records
            if not job.consumers and settings.world_size != job.settings.world_size:
                job.resize(settings.world_size, epoch)  # the job came back in another size
            for f in fields(JobSettings):
                mine, theirs = getattr(settings, f.name), getattr(job.settings, f.name)
                if mine != theirs:
                    hint = (
                        f" (a job resizes once every consumer of the old size has left; "
                        f"{len(job.consumers)} are still in it)"
                        if f.name == "world_size"
                        else ""
                    )
                    raise JobConflict(
                        f"job {name!r} has {f.name} {theirs!r}; this consumer asked for {mine!r}{hint}"
                    )
            with job.cond:
                consumer = Consumer(next(self._ids), peer, rank, epoch)
                job.epoch = max(job.epoch, epoch)
                job.consumers[consumer.id] = consumer
                job.idle_since = None
                job.cond.notify_all()
            return job, consumer

    def leave(self, job: Job, consumer: Consumer) -> None:
        with self._lock, job.cond:
            job.consumers.pop(consumer.id, None)
            if not job.consumers:
                job.idle_since = time.monotonic()
            job.cond.notify_all()

    def _make_room(self, name: str) -> None:
        if len(self._jobs) < self.max_jobs:
            return
        idle = [(job.idle_since, n) for n, job in self._jobs.items() if job.idle_since is not None]
        if not idle:
            raise TooManyJobs(
                f"cannot start job {name!r}: this server has max_jobs={self.max_jobs} jobs, each with "
                "consumers; reuse a job name, or raise --max-jobs"
            )
        self._forget(min(idle)[1])

    def _forget(self, name: str) -> None:
        job = self._jobs.pop(name)
        job.close()
        if job.journal is not None and self._state is not None:
            job.journal.close()
            self._state.remove(name)

    def _expire(self) -> None:
        now = time.monotonic()
        for name, job in list(self._jobs.items()):
            if job.idle_since is not None and now - job.idle_since > self.idle_s:
                self._forget(name)

    def close(self) -> None:
        """The server stops: its journals are closed (their files stay for the next one)."""
        with self._lock:
            for job in self._jobs.values():
                if job.journal is not None:
                    job.journal.close()
            if self._state is not None:
                self._state.close()

    def jobs(self) -> list[Job]:
        with self._lock:
            self._expire()
            return list(self._jobs.values())
