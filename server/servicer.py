"""The gRPC Loader service: admission, listings, and StreamBatches from open to end.

One StreamBatches call is one epoch (or its rest) for one client::

    admit (max_streams) -> open -> plan (server/plan.py) -> join the job (job modes)
      -> the mode's sender (server/modes/) -> end frame -> the client's releases

Every way a stream can end is mapped here, in one place, to a status: bad input
(INVALID_ARGUMENT and friends, from :mod:`.plan`), the dataset's failure (INTERNAL,
marked as the dataset's), no room (RESOURCE_EXHAUSTED), the server closing
(UNAVAILABLE, so clients reconnect). Whatever a stream holds is given back when it
ends, however it ends; one stream's failure never touches another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from batchferry import wire
from batchferry.errors import DATASET_ERROR_KEY
from batchferry.layout import batch_bytes_hint, describe
from batchferry.v1 import loader_pb2 as _pb2

from .builder import Builder, Counters
from .credits import ClientMessages
from .datasets import MapDataset
from .framing import END
from .jobs import Consumer, Job, JobConflict, JobRegistry
from .modes import SENDERS
from .plan import Catalog, Plan, plan
from .ring import SlotRing
from .status import Abort, StreamGone, invalid
from .stream import Stream
from .workers import WorkerPool

__all__ = ["LoaderService"]

log = logging.getLogger("batchferry.server")

# After the last batch, how long a same-host client may take to release its slots.
_RELEASE_TIMEOUT = 60.0


class LoaderService:
    def __init__(
        self,
        datasets: dict[str, MapDataset],
        collates: frozenset[str],
        pool: WorkerPool,
        ring: SlotRing,
        jobs: JobRegistry,
        *,
        chunk_bytes: int,
        max_streams: int = 64,
        replica_index: int = 0,
        num_replicas: int = 1,
        slot_timeout: float = 60.0,
        server_id: str = "",
    ) -> None:
        self._pool = pool
        self._ring = ring
        self._jobs = jobs
        self._slot_timeout = slot_timeout
        self._server_id = server_id
        self.catalog = Catalog(
            lengths={name: len(ds) for name, ds in datasets.items()},
            collates=collates,
            chunk_bytes=chunk_bytes,
            replica=replica_index,
            replicas=num_replicas,
        )
        # Counted here rather than by gRPC's maximum_concurrent_rpcs, so that health
        # checks and listings are still answered while every stream slot is taken.
        self._stream_slots = threading.BoundedSemaphore(max_streams)
        self._max_streams = max_streams
        self._closing = threading.Event()
        self._samples = {name: _first_sample(ds) for name, ds in datasets.items()}
        self._infos = [
            _pb2.DatasetInfo(
                name=name,
                length=len(ds),
                sample_structure=describe(self._samples[name])
                if self._samples[name] is not None
                else "(unavailable)",
            )
            for name, ds in sorted(datasets.items())
        ]
        self.counters = Counters()

    @property
    def batches_built(self) -> int:
        return self.counters.built

    @property
    def batches_gathered(self) -> int:
        return self.counters.gathered

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "ListDatasets": grpc.unary_unary_rpc_method_handler(self.list_datasets),
                "StreamBatches": grpc.stream_stream_rpc_method_handler(self.stream_batches),
                "ListJobs": grpc.unary_unary_rpc_method_handler(self.list_jobs),
            },
        )

    def shutdown(self) -> None:
        """End every stream now with UNAVAILABLE (clients reconnect); refuse new ones."""
        self._closing.set()

    # -- listings ---------------------------------------------------------------------
    def list_datasets(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            wire.parse(_pb2.ListDatasetsRequest, request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return _pb2.ListDatasetsResponse(
            datasets=self._infos,
            shm_probe=self._ring.probe_name,
            shm_token=self._ring.probe_token,
            replica_index=self.catalog.replica,
            num_replicas=self.catalog.replicas,
            server_id=self._server_id,
        ).SerializeToString()

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
        if self._closing.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if not self._stream_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server already serves max_streams={self._max_streams} streams; "
                "raise --max-streams or add replicas",
            )
        try:
            yield from self._stream(requests, context)
        except StreamGone:
            if self._closing.is_set():
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        except Abort as exc:
            if exc.dataset_error:
                context.set_trailing_metadata(((DATASET_ERROR_KEY, "1"),))
            context.abort(exc.code, exc.details)
        finally:
            self._stream_slots.release()

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        the_plan = plan(_open_message(requests), self.catalog)

        def active() -> bool:
            return not self._closing.is_set() and bool(context.is_active())

        job: Job | None = None
        consumer: Consumer | None = None
        if the_plan.settings is not None:
            try:
                job, consumer = self._jobs.join(
                    the_plan.job, the_plan.settings, context.peer(), the_plan.rank, the_plan.epoch
                )
            except JobConflict as exc:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            consumer.total = the_plan.local_total
            consumer.sent = the_plan.local_start
        messages = ClientMessages(requests, the_plan.credits)
        stream = Stream(
            plan=the_plan,
            messages=messages,
            builder=self._builder(the_plan, job, active),
            active=active,
            ring_slots=self._ring.target_slots,
            job=job,
            consumer=consumer,
        )
        try:
            complete = yield from SENDERS[the_plan.mode](stream)
            if messages.error is not None:
                raise invalid(messages.error)
            if not complete and not messages.stopped:
                if self._closing.is_set():
                    raise StreamGone
                return
            yield END
            # Same host: the client releases the last slots, then half-closes.
            messages.wait_released(_RELEASE_TIMEOUT, active)
            if messages.error is not None:
                raise invalid(messages.error)
        finally:
            messages.close()
            if job is not None and consumer is not None:
                self._jobs.leave(job, consumer)

    def _builder(self, the_plan: Plan, job: Job | None, active: Any) -> Builder:
        def count_for_job() -> None:
            if job is not None:
                job.batches_built += 1

        return Builder(
            the_plan,
            self._ring,
            self._pool,
            self.counters,
            active,
            min_bytes=self._size_hint(the_plan),
            acquire_timeout=self._slot_timeout,
            on_built=count_for_job,
        )

    def _size_hint(self, the_plan: Plan) -> int:
        """Bytes a typical batch of this stream needs (from sample 0), to size its first slots."""
        sample = self._samples.get(the_plan.dataset)
        rows = min(the_plan.batch_size, self.catalog.lengths[the_plan.dataset])
        hint = batch_bytes_hint(sample, rows) if sample is not None else 0
        return min(hint, self._ring.max_bytes // self._ring.target_slots)


def _open_message(requests: Iterator[bytes]) -> _pb2.OpenStream:
    try:
        first = next(requests)
    except StopIteration:
        raise invalid("stream ended before an open message") from None
    try:
        msg = wire.parse(_pb2.ClientMessage, first)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if msg.WhichOneof("kind") != "open":
        raise invalid("the first message of a stream must be 'open'")
    return msg.open


def _first_sample(ds: MapDataset) -> Any:
    """Sample 0, to describe the dataset and size its batches; None if unreadable."""
    if len(ds) == 0:
        return None
    try:
        return ds[0]
    except Exception:
        log.warning("reading sample 0 failed; batches will size their slots on first use", exc_info=True)
        return None
