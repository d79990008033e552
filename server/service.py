"""gRPC handlers: validate requests, order the epoch, stream built batches in order.

One StreamBatches call is one epoch (or its rest) for one client:

    OPEN -> (validated) START sent -> per batch: BUILDING -> SENT -> DONE

The stream keeps at most ``credits`` batches built or being built ahead of what
the client has consumed; each batch holds one ring slot from submission until
its bytes are copied into chunk messages. Errors in one stream never touch others.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import numpy as np

from batchferry import sampling, wire
from batchferry.errors import DATASET_ERROR_KEY
from batchferry.layout import batch_bytes_hint, describe
from batchferry.v1 import loader_pb2 as _pb2

from .collate import CollateFn, SlotCollate
from .datasets import MapDataset
from .jobs import Consumer, Job, JobConflict, JobRegistry, JobSettings
from .modes import DynamicEpoch, SharedBatch, SharedEpoch
from .ring import RingExhausted, Slot, SlotRing
from .workers import Result, Task, WorkerPool

__all__ = ["LoaderService"]

log = logging.getLogger("batchferry.server")

MAX_CREDITS = 64
_WAIT = 0.2  # seconds between liveness checks while blocked
_POLL = 0.02  # while waiting on other consumers of a job
# How long a slot abandoned by an ending stream stays openable by name.
_LINGER = 30.0
# After the last batch, how long a same-host client may take to release its slots.
_RELEASE_TIMEOUT = 60.0
_END_FRAME = _pb2.ServerFrame(end=_pb2.StreamEnd()).SerializeToString()
_MODE_NAMES = {
    _pb2.MODE_INDEPENDENT: "independent",
    _pb2.MODE_SHARDED: "sharded",
    _pb2.MODE_SHARED: "shared",
    _pb2.MODE_DYNAMIC: "dynamic",
}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, dataset_error: bool = False) -> None:
        super().__init__(details)
        self.code, self.details, self.dataset_error = code, details, dataset_error


def _fail(code: grpc.StatusCode, details: str) -> NoReturn:
    raise _Abort(code, details)


def _dataset_error(plan: _Plan, index: int, result: Result) -> _Abort:
    """The dataset or collate raised while building batch ``index``."""
    return _Abort(
        grpc.StatusCode.INTERNAL,
        f"dataset {plan.dataset!r}, batch {index}: {result.error}",
        dataset_error=True,
    )


@dataclass(frozen=True)
class _Plan:
    dataset: str
    collate: str
    batch_size: int
    num_batches: int
    start_batch: int
    credits: int
    chunk_bytes: int
    order: sampling.EpochOrder
    shm: bool
    mode: int = _pb2.MODE_INDEPENDENT
    job: str = ""
    rank: int = 0
    epoch: int = 0
    settings: JobSettings | None = None
    # Scale-out: this stream carries only the batches b with b % replicas == replica.
    # Loops count positions p among those (p-th of this replica's batches); frames,
    # releases and the client speak in whole-epoch batch indices.
    replica: int = 0
    replicas: int = 1

    @property
    def local_total(self) -> int:
        """This replica's batches in the epoch."""
        return self.local(self.num_batches)

    @property
    def local_start(self) -> int:
        return self.local(self.start_batch)

    def local(self, index: int) -> int:
        """This replica's batches before epoch batch ``index`` (its position when it is one of them)."""
        return (index - self.replica + self.replicas - 1) // self.replicas

    def batch_index(self, position: int) -> int:
        """Epoch batch index of this replica's ``position``-th batch (num_batches past the end)."""
        return min(position * self.replicas + self.replica, self.num_batches)


class _ClientMessages:
    """Reads the client's messages on its own thread: credits granted, slots released.

    Slots sent over the same-host transport are held here until the client
    releases them; whatever is still held when the stream ends is released then.
    """

    def __init__(
        self,
        requests: Iterator[bytes],
        initial: int,
        release: Callable[[int, Slot], None],
        detach: Callable[[int, Slot], None],
        abandon: Callable[[int, Slot], None] | None = None,
        on_credit: Callable[[int], None] | None = None,
    ) -> None:
        self._on_credit = on_credit
        self._requests = requests
        self._release_slot = release
        self._detach_slot = detach
        self._abandon_slot = abandon or detach
        self._cond = threading.Condition()
        self.granted = initial
        self.held: dict[int, Slot] = {}
        self.error: str | None = None
        self.ended = False
        self._thread = threading.Thread(target=self._run, name="batchferry-client-messages", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in self._requests:
                msg = wire.parse(_pb2.ClientMessage, raw)
                kind = msg.WhichOneof("kind")
                if kind == "credit" and msg.credit.batches >= 1:
                    with self._cond:
                        self.granted += msg.credit.batches
                        granted = self.granted
                        self._cond.notify_all()
                    if self._on_credit is not None:
                        self._on_credit(granted)
                elif kind == "release":
                    self._release(msg.release.index, self._release_slot)
                elif kind == "detach":
                    self._release(msg.detach.index, self._detach_slot)
                else:
                    raise ValueError(
                        "after open, the client may only send credit (batches >= 1) and release messages"
                    )
        except ValueError as exc:
            self.error = str(exc)
        except Exception:  # the call was cancelled or the peer went away
            pass
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def hold(self, index: int, slot: Slot) -> None:
        with self._cond:
            self.held[index] = slot

    def _release(self, index: int, how: Callable[[int, Slot], None]) -> None:
        with self._cond:
            slot = self.held.pop(index, None)
            if slot is None:
                raise ValueError(f"release: batch {index} holds no slot")
            self._cond.notify_all()
        how(index, slot)

    def wait_released(self, timeout: float, active: Callable[[], bool]) -> None:
        """Until the client released every slot, half-closed, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.held and not self.ended and active() and time.monotonic() < deadline:
                self._cond.wait(_WAIT)

    def release_all(self) -> None:
        """At stream end: slots the client never released may still back its batches, so
        they are detached (never reused) rather than released."""
        with self._cond:
            held, self.held = list(self.held.items()), {}
        for index, slot in held:
            self._abandon_slot(index, slot)

    def wait_for(self, sent: int, active: Callable[[], bool]) -> bool:
        """Block until a send is allowed (granted > sent); False when the call is over
        or the client half-closed (it wants no more batches)."""
        with self._cond:
            while self.granted <= sent:
                if self.error is not None or self.ended or not active():
                    return False
                self._cond.wait(_WAIT)
            return True


class LoaderService:
    def __init__(
        self,
        datasets: dict[str, MapDataset],
        collates: dict[str, SlotCollate | CollateFn],
        pool: WorkerPool,
        ring: SlotRing,
        chunk_bytes: int,
        jobs: JobRegistry,
        *,
        max_streams: int = 64,
        replica_index: int = 0,
        num_replicas: int = 1,
    ) -> None:
        self._jobs = jobs
        self._replica, self._replicas = replica_index, num_replicas
        # Counted here rather than by gRPC's maximum_concurrent_rpcs, so that health
        # checks and listings are still answered while every stream slot is taken.
        self._stream_slots = threading.BoundedSemaphore(max_streams)
        self._max_streams = max_streams
        self._datasets = datasets
        self._collates = collates
        self._pool = pool
        self._ring = ring
        self._chunk_bytes = chunk_bytes
        samples = {name: _first_sample(ds) for name, ds in datasets.items()}
        self._infos = [
            _pb2.DatasetInfo(
                name=name,
                length=len(ds),
                sample_structure=describe(samples[name]) if samples[name] is not None else "(unavailable)",
            )
            for name, ds in sorted(datasets.items())
        ]
        self._samples = samples
        # Across all streams, for tests and metrics.
        self.batches_built = 0
        self.batches_gathered = 0  # of which built by the vectorised gather
        self._count_lock = threading.Lock()

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "ListDatasets": grpc.unary_unary_rpc_method_handler(self.list_datasets),
                "StreamBatches": grpc.stream_stream_rpc_method_handler(self.stream_batches),
                "ListJobs": grpc.unary_unary_rpc_method_handler(self.list_jobs),
            },
        )

    # -- ListDatasets -----------------------------------------------------------------
    def list_datasets(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            wire.parse(_pb2.ListDatasetsRequest, request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return _pb2.ListDatasetsResponse(
            datasets=self._infos,
            shm_probe=self._ring.probe_name,
            shm_token=self._ring.probe_token,
            replica_index=self._replica,
            num_replicas=self._replicas,
        ).SerializeToString()

    # -- ListJobs ---------------------------------------------------------------------
    def list_jobs(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            wire.parse(_pb2.ListJobsRequest, request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        infos = []
        for job in self._jobs.jobs():
            with job.cond:
                consumers = [
                    _pb2.ConsumerInfo(
                        peer=c.peer, rank=c.rank, epoch=c.epoch, batches_sent=c.sent, num_batches=c.total
                    )
                    for c in job.consumers.values()
                ]
            s = job.settings
            infos.append(
                _pb2.JobInfo(
                    name=job.name,
                    mode=s.mode,
                    dataset=s.dataset,
                    batch_size=s.batch_size,
                    world_size=s.world_size,
                    consumers=consumers,
                    batches_built=job.batches_built,
                )
            )
        return _pb2.ListJobsResponse(jobs=infos).SerializeToString()

    # -- StreamBatches ----------------------------------------------------------------
    def stream_batches(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        if not self._stream_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server already serves max_streams={self._max_streams} streams; "
                "raise --max-streams or add replicas",
            )
        try:
            yield from self._stream(requests, context)
        except _Abort as exc:
            if exc.dataset_error:
                context.set_trailing_metadata(((DATASET_ERROR_KEY, "1"),))
            context.abort(exc.code, exc.details)
        finally:
            self._stream_slots.release()

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            first = next(requests)
        except StopIteration:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "stream ended before an open message")
        try:
            msg = wire.parse(_pb2.ClientMessage, first)
        except ValueError as exc:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if msg.WhichOneof("kind") != "open":
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a stream must be 'open'")
        plan = self._plan(msg.open)
        job: Job | None = None
        consumer: Consumer | None = None
        if plan.settings is not None:
            try:
                job, consumer = self._jobs.join(
                    plan.job, plan.settings, context.peer(), plan.rank, plan.epoch
                )
            except JobConflict as exc:
                _fail(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            consumer.total = plan.local_total
            consumer.sent = plan.local_start
        try:
            if plan.mode == _pb2.MODE_SHARED:
                assert job is not None and consumer is not None
                yield from self._send_shared(plan, requests, context, job, consumer)
                return
            if plan.mode == _pb2.MODE_DYNAMIC:
                assert job is not None and consumer is not None
                yield from self._send_dynamic(plan, requests, context, job, consumer)
                return
            credits = _ClientMessages(
                requests, plan.credits, self._release_to_ring, self._detach_from_ring, self._abandon_to_ring
            )
            yield self._start_frame(plan, plan.start_batch)
            yield from self._send_batches(plan, credits, context, job, consumer)
        finally:
            if job is not None and consumer is not None:
                self._jobs.leave(job, consumer)

    @staticmethod
    def _start_frame(plan: _Plan, first: int) -> bytes:
        return _pb2.ServerFrame(
            start=_pb2.StreamStart(
                num_batches=plan.num_batches,
                state_after_order=plan.order.state_after_order,
                state_after_epoch=plan.order.state_after_epoch,
                first_batch=first,
            )
        ).SerializeToString()

    def _release_to_ring(self, _index: int, slot: Slot) -> None:
        self._ring.release(slot)

    def _detach_from_ring(self, _index: int, slot: Slot) -> None:
        self._ring.detach(slot)

    def _abandon_to_ring(self, _index: int, slot: Slot) -> None:
        # The client may not have opened it yet: keep the name valid for a while.
        self._ring.detach(slot, linger=_LINGER)

    def _send_one(
        self, plan: _Plan, credits: _ClientMessages, index: int, layout: bytes, slot: Slot
    ) -> list[bytes]:
        """Frames for one built batch; with the byte stream the slot may be reused after this."""
        if plan.shm:
            credits.hold(index, slot)
            return [self._shm_frame(index, layout, slot)]
        return self._frames(index, layout, slot, plan.chunk_bytes)

    def _build_now(
        self, plan: _Plan, index: int, min_bytes: int, active: Callable[[], bool], job: Job
    ) -> tuple[Slot, Result]:
        """Build one batch and wait for it, growing its slot until it fits."""
        while True:
            slot = self._acquire(min_bytes, active, wait=True)
            assert slot is not None
            result = self._result(self._submit(plan, index, slot, job), active)
            if result is None:
                self._ring.release(slot)
                raise _Abort(grpc.StatusCode.CANCELLED, "stream cancelled")
            if result.status == "overflow":
                self._ring.release(slot)
                min_bytes = max(min_bytes, result.needed)
                continue
            if result.status == "error":
                self._ring.release(slot)
                raise _dataset_error(plan, index, result)
            return slot, result

    # -- dynamic: first come first served, exactly once --------------------------------
    def _send_dynamic(
        self,
        plan: _Plan,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        job: Job,
        consumer: Consumer,
    ) -> Iterator[bytes]:
        work = self._epoch_state(job, plan, lambda: DynamicEpoch(plan.local_total, job.cond))
        assert isinstance(work, DynamicEpoch)
        credits = _ClientMessages(
            requests, plan.credits, self._release_to_ring, self._detach_from_ring, self._abandon_to_ring
        )
        sent: collections.deque[int] = collections.deque()  # positions sent, not yet in the client's loop
        acked = sent_count = 0
        active = context.is_active
        min_bytes = self._size_hint(plan)
        yield self._start_frame(plan, 0)
        try:
            while active() and credits.error is None and not credits.ended:
                # Each credit beyond the first grant means the client took one more batch into its loop.
                acked += self._ack(work, consumer, sent, credits.granted - plan.credits - acked)
                if sent_count >= credits.granted:
                    work.wait(_POLL)  # no credit: the client has not taken enough batches yet
                    continue
                position = work.take(consumer.id)
                if position is None:
                    if work.finished:
                        yield _END_FRAME
                        credits.wait_released(_RELEASE_TIMEOUT, active)
                        return
                    work.wait(_POLL)  # others hold batches that may come back
                    continue
                index = plan.batch_index(position)
                try:
                    slot, result = self._build_now(plan, index, min_bytes, active, job)
                except BaseException:
                    work.give_back(consumer.id, position)
                    raise
                min_bytes = max(min_bytes, slot.capacity)
                frames = self._send_one(plan, credits, index, result.layout, slot)
                if not plan.shm:
                    self._ring.release(slot)
                yield from frames
                sent.append(position)
                sent_count += 1
                consumer.sent += 1
            if credits.error is not None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, credits.error)
        finally:
            # Acknowledgements that arrived with the client's goodbye still count.
            acked += self._ack(work, consumer, sent, credits.granted - plan.credits - acked)
            credits.release_all()
            lost = work.leave(consumer.id)
            if lost:
                log.info("job %r: %d batch(es) of a departed consumer go to others", job.name, len(lost))

    @staticmethod
    def _ack(work: DynamicEpoch, consumer: Consumer, sent: collections.deque[int], due: int) -> int:
        """Mark the oldest ``due`` sent batches as taken into the client's loop."""
        done = 0
        while done < due and sent:
            work.ack(consumer.id, sent.popleft())
            done += 1
        return done

    # -- shared: every consumer gets every batch, each built once ----------------------
    def _send_shared(
        self,
        plan: _Plan,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
        job: Job,
        consumer: Consumer,
    ) -> Iterator[bytes]:
        window = max(1, min(2 * plan.credits, self._ring.num_slots // 2))
        work = self._epoch_state(
            job, plan, lambda: SharedEpoch(plan.local_total, window, job.cond, self._release_shared)
        )
        assert isinstance(work, SharedEpoch)
        # SharedEpoch counts positions among this replica's batches; messages carry epoch indices.
        first = index = work.join(consumer.id, plan.local_start)
        total = plan.local_total
        consumer.sent = index
        credits = _ClientMessages(
            requests,
            plan.credits,
            lambda i, _slot: work.done(consumer.id, plan.local(i)),
            lambda i, _slot: work.done(consumer.id, plan.local(i), detach=True),
            # Consumption counts the moment the credit arrives (late joiners start there).
            on_credit=lambda granted: work.consume(consumer.id, first + granted - plan.credits),
        )
        active = context.is_active
        min_bytes = self._size_hint(plan)

        def ensure_built(j: int, wait: bool) -> SharedBatch:
            entry, mine = work.get(j)
            if mine:
                slot: Slot | None = None
                future: Future[Result] | None = None
                try:
                    slot = self._acquire(min_bytes, active, wait=wait)
                    if slot is not None:
                        future = self._submit(plan, plan.batch_index(j), slot, job)
                finally:
                    work.built(entry, slot, future)
            return entry

        yield self._start_frame(plan, plan.batch_index(index))
        try:
            while index < total and active() and credits.error is None and not credits.ended:
                if not work.may_build(index):
                    work.wait(_POLL)  # the slowest consumer holds the window
                    continue
                entry = ensure_built(index, wait=True)
                for ahead in range(index + 1, min(index + 1 + plan.credits, total)):
                    if work.may_build(ahead):
                        ensure_built(ahead, wait=False)
                while not entry.ready.wait(_POLL):
                    if not active():
                        return
                if entry.failed or entry.future is None or entry.slot is None:
                    continue  # its builder gave up: build it again
                result = self._result(entry.future, active)
                if result is None:
                    return
                if result.status == "overflow":
                    min_bytes = max(min_bytes, result.needed)
                    work.rebuild(entry)
                    continue
                if result.status == "error":
                    raise _dataset_error(plan, plan.batch_index(index), result)
                if not credits.wait_for(index - first, active):
                    return
                frames = self._send_one(plan, credits, plan.batch_index(index), result.layout, entry.slot)
                if not plan.shm:
                    work.done(consumer.id, index)
                yield from frames
                index += 1
                consumer.sent = index
            if credits.error is not None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, credits.error)
            if index >= total:
                yield _END_FRAME
                credits.wait_released(_RELEASE_TIMEOUT, active)
        finally:
            credits.release_all()
            work.leave(consumer.id)

    def _release_shared(self, entry: SharedBatch) -> None:
        if entry.slot is None or entry.future is None:
            return
        if entry.detach:
            self._ring.detach(entry.slot, linger=_LINGER)  # a consumer keeps it
        else:
            entry.future.add_done_callback(functools.partial(self._release_when_done, entry.slot))

    def _size_hint(self, plan: _Plan) -> int:
        sample = self._samples.get(plan.dataset)
        hint = batch_bytes_hint(sample, plan.batch_size) if sample is not None else 0
        return min(hint, self._ring.max_bytes // self._ring.num_slots)

    @staticmethod
    def _epoch_state(job: Job, plan: _Plan, make: Callable[[], object]) -> object:
        with job.cond:
            state = job.epochs.get(plan.epoch)
            if state is None:
                state = job.epochs[plan.epoch] = make()
            return state

    def _plan(self, req: _pb2.OpenStream) -> _Plan:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not req.dataset:
            _fail(invalid, "dataset: required")
        ds = self._datasets.get(req.dataset)
        if ds is None:
            _fail(
                grpc.StatusCode.NOT_FOUND,
                f"dataset {req.dataset!r} not found; this server has: {', '.join(sorted(self._datasets))}",
            )
        if req.batch_size < 1:
            _fail(invalid, f"batch_size must be >= 1, got {req.batch_size}")
        collate = req.collate or "default"
        if collate not in self._collates:
            _fail(
                grpc.StatusCode.NOT_FOUND,
                f"collate {collate!r} not found; registered: {', '.join(sorted(self._collates))}",
            )
        if req.epoch < 0:
            _fail(invalid, f"epoch must be >= 0, got {req.epoch}")
        if not 1 <= req.credits <= MAX_CREDITS:
            _fail(invalid, f"credits must be in [1, {MAX_CREDITS}], got {req.credits}")
        chunk = req.chunk_bytes or self._chunk_bytes
        if not wire.MIN_CHUNK_BYTES <= chunk <= wire.MAX_CHUNK_BYTES:
            _fail(
                invalid,
                f"chunk_bytes must be 0 or in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}], "
                f"got {req.chunk_bytes}",
            )
        length = len(ds)
        settings = None
        if req.mode not in _MODE_NAMES:
            _fail(invalid, f"mode: unknown value {req.mode}")
        if req.mode == _pb2.MODE_INDEPENDENT:
            if req.shuffle and not req.sampler_state:
                _fail(invalid, "sampler_state: required when shuffle is true")
            try:
                order = sampling.epoch_order(length, req.shuffle, req.sampler_state)
            except ValueError as exc:
                _fail(invalid, f"sampler_state: {exc}")
        else:
            mode = _MODE_NAMES[req.mode]
            if not req.job:
                _fail(invalid, f"job: required in {mode} mode")
            if req.world_size < 1:
                _fail(invalid, f"world_size must be >= 1, got {req.world_size}")
            if not 0 <= req.rank < req.world_size:
                _fail(invalid, f"rank must be in [0, world_size={req.world_size}), got {req.rank}")
            settings = JobSettings(
                req.mode,
                req.dataset,
                req.batch_size,
                req.shuffle,
                req.drop_last,
                collate,
                req.seed,
                req.world_size,
            )
            if req.mode == _pb2.MODE_SHARDED:
                order = sampling.sharded_order(
                    length, req.shuffle, req.seed, req.epoch, req.rank, req.world_size, req.drop_last
                )
            else:  # shared and dynamic split the whole epoch among the job's consumers
                order = sampling.EpochOrder(
                    sampling.seeded_order(length, req.shuffle, req.seed, req.epoch), b"", b""
                )
        total = sampling.num_batches(len(order.indices), req.batch_size, req.drop_last)
        if not 0 <= req.start_batch <= total:
            _fail(invalid, f"start_batch must be in [0, {total}], got {req.start_batch}")
        if req.transport not in (_pb2.TRANSPORT_BYTES, _pb2.TRANSPORT_SHM):
            _fail(invalid, f"transport: unknown value {req.transport}")
        wanted = (req.replica_index, req.num_replicas or 1)
        if wanted != (self._replica, self._replicas):
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server is replica {self._replica} of {self._replicas}, but the stream asks for "
                f"replica {wanted[0]} of {wanted[1]}; give the loader every replica's address "
                "(or a dns:/// name that resolves to all of them)",
            )
        return _Plan(
            req.dataset,
            collate,
            req.batch_size,
            total,
            req.start_batch,
            req.credits,
            chunk,
            order,
            shm=req.transport == _pb2.TRANSPORT_SHM,
            mode=req.mode,
            job=req.job,
            rank=req.rank,
            epoch=req.epoch,
            settings=settings,
            replica=self._replica,
            replicas=self._replicas,
        )

    def _send_batches(
        self,
        plan: _Plan,
        credits: _ClientMessages,
        context: grpc.ServicerContext,
        job: Job | None = None,
        consumer: Consumer | None = None,
    ) -> Iterator[bytes]:
        # Positions among this replica's batches (all of them with one replica).
        pending: collections.deque[tuple[int, Slot, Future[Result]]] = collections.deque()
        start, total = plan.local_start, plan.local_total
        next_build = next_send = start
        # Size slots for a typical batch up front; a batch that outgrows it reports its size.
        min_bytes = self._size_hint(plan)
        active = context.is_active
        try:
            while next_send < total:
                # Build up to one credit window beyond what the client has granted, so
                # builds overlap the credit round trip; sends never exceed the grant.
                # Block for a slot only while holding none: a stream never waits on itself.
                sendable = credits.granted - (next_send - start)
                while next_build < total and next_build - next_send < sendable + plan.credits:
                    slot = self._acquire(min_bytes, active, wait=not pending)
                    if slot is None:
                        break
                    index = plan.batch_index(next_build)
                    pending.append((index, slot, self._submit(plan, index, slot, job)))
                    next_build += 1
                if not pending:
                    if not credits.wait_for(next_send - start, active):
                        break
                    continue
                index, slot, future = pending[0]
                result = self._result(future, active)
                if result is None:
                    break
                if result.status == "overflow":
                    # Rebuild from this batch in slots of the size it needs; builds
                    # made ahead in smaller slots are dropped, not waited for.
                    min_bytes = max(min_bytes, result.needed)
                    self._ring.release(slot)
                    pending.popleft()
                    self._drop(pending)
                    next_build = next_send
                    continue
                pending.popleft()
                if result.status == "error":
                    self._ring.release(slot)
                    raise _dataset_error(plan, index, result)
                if plan.shm:
                    credits.hold(index, slot)
                    frames = [self._shm_frame(index, result.layout, slot)]
                else:
                    frames = self._frames(index, result.layout, slot, plan.chunk_bytes)
                    self._ring.release(slot)
                if not credits.wait_for(next_send - start, active):
                    break
                yield from frames
                next_send += 1
                if consumer is not None:
                    consumer.sent = next_send
            if credits.error is not None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, credits.error)
            if next_send == total:
                yield _END_FRAME
                credits.wait_released(_RELEASE_TIMEOUT, active)
                if credits.error is not None:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, credits.error)
        finally:
            self._drop(pending)
            credits.release_all()

    def _drop(self, pending: collections.deque[tuple[int, Slot, Future[Result]]]) -> None:
        """Forget builds; each slot is released once its worker is done writing to it."""
        for _, slot, future in pending:
            future.add_done_callback(functools.partial(self._release_when_done, slot))
        pending.clear()

    def _release_when_done(self, slot: Slot, _future: Future[Result]) -> None:
        self._ring.release(slot)

    def _acquire(self, min_bytes: int, active: Callable[[], bool], *, wait: bool) -> Slot | None:
        """A slot, or None when ``wait`` is false and none is free now."""
        try:
            slot = self._ring.acquire(
                min_bytes, timeout=3600.0 if wait else 0.0, cancelled=lambda: not active()
            )
        except RingExhausted as exc:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        if slot is None and wait:
            raise _Abort(grpc.StatusCode.CANCELLED, "stream cancelled or server closing")
        return slot

    def _submit(self, plan: _Plan, index: int, slot: Slot, job: Job | None = None) -> Future[Result]:
        indices = plan.order.batch(index, plan.batch_size).numpy().astype(np.int64, copy=False)
        task = Task(plan.dataset, indices, plan.collate, slot.name, slot.capacity)
        try:
            future = self._pool.submit(task)
        except RuntimeError as exc:
            self._ring.release(slot)
            raise _Abort(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        future.add_done_callback(functools.partial(self._count, job))
        return future

    def _count(self, job: Job | None, future: Future[Result]) -> None:
        result = future.result()
        if result.status == "ok":
            with self._count_lock:
                self.batches_built += 1
                self.batches_gathered += result.gathered
                if job is not None:
                    job.batches_built += 1

    @staticmethod
    def _result(future: Future[Result], active: Callable[[], bool]) -> Result | None:
        while True:
            try:
                return future.result(timeout=_WAIT)
            except TimeoutError:
                if not active():
                    return None

    @staticmethod
    def _shm_frame(index: int, layout_bytes: bytes, slot: Slot) -> bytes:
        header = _pb2.BatchHeader(index=index, layout=_pb2.Layout.FromString(layout_bytes), slot=slot.name)
        return _pb2.ServerFrame(batch=header).SerializeToString()

    @staticmethod
    def _frames(index: int, layout_bytes: bytes, slot: Slot, chunk: int) -> list[bytes]:
        layout = _pb2.Layout.FromString(layout_bytes)
        size = layout.payload_bytes
        # The only copy on the server: slot -> message bytes (gRPC needs bytes objects).
        with slot.segment.memory() as view:
            chunks = [bytes(view[o : min(o + chunk, size)]) for o in range(0, size, chunk)]
        header = _pb2.ServerFrame(batch=_pb2.BatchHeader(index=index, layout=layout, num_chunks=len(chunks)))
        return [header.SerializeToString(), *chunks]


def _first_sample(ds: MapDataset) -> Any:
    """Sample 0, to describe the dataset and size its batches; None if unreadable."""
    if len(ds) == 0:
        return None
    try:
        return ds[0]
    except Exception:
        log.warning("reading sample 0 failed; batches will size their slots on first use", exc_info=True)
        return None
