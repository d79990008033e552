"""Jobs: named groups of consumers sharing one dataset in sharded, shared or dynamic mode.

A job is created by its first consumer, which fixes its settings; later
consumers must agree (else FAILED_PRECONDITION naming the field). It ends when
it has had no consumer for ``idle_s`` seconds. Lock order: ``JobRegistry._lock``
before ``Job.cond``.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, fields

from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["Consumer", "Job", "JobConflict", "JobRegistry", "JobSettings"]


class JobConflict(Exception):
    """A consumer's settings disagree with its job's."""


@dataclass(frozen=True)
class JobSettings:
    mode: _pb2.Mode
    dataset: str
    batch_size: int
    shuffle: bool
    drop_last: bool
    collate: str
    seed: int
    world_size: int


@dataclass
class Consumer:
    id: int
    peer: str
    rank: int
    epoch: int
    sent: int = 0
    total: int = 0


@dataclass
class Job:
    name: str
    settings: JobSettings
    consumers: dict[int, Consumer] = field(default_factory=dict)
    batches_built: int = 0
    idle_since: float | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)
    # Mode-specific per-epoch state (see server/modes.py), keyed by epoch.
    epochs: dict[int, object] = field(default_factory=dict)


class JobRegistry:
    def __init__(self, idle_s: float = 300.0) -> None:
        self.idle_s = idle_s
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
                job = self._jobs[name] = Job(name, settings)
            for f in fields(JobSettings):
                mine, theirs = getattr(settings, f.name), getattr(job.settings, f.name)
                if mine != theirs:
                    raise JobConflict(
                        f"job {name!r} has {f.name} {theirs!r}; this consumer asked for {mine!r}"
                    )
            with job.cond:
                consumer = Consumer(next(self._ids), peer, rank, epoch)
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

    def _expire(self) -> None:
        now = time.monotonic()
        for name, job in list(self._jobs.items()):
            if job.idle_since is not None and now - job.idle_since > self.idle_s:
                del self._jobs[name]

    def jobs(self) -> list[Job]:
        with self._lock:
            self._expire()
            return list(self._jobs.values())
