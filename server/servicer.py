"""The gRPC Loader service: admission, listings, and StreamBatches from open to end.

One StreamBatches call is one epoch (or its rest) for one client::

    admit (max_streams) -> open -> plan (server/plan.py) -> join the job (job modes)
      -> the mode's sender (server/modes/) -> end frame -> the client's releases

Every way a stream can end is mapped here, in one place, to a status: bad input
(INVALID_ARGUMENT and friends, from :mod:`.plan`), no room (RESOURCE_EXHAUSTED), the
server closing (UNAVAILABLE, so clients reconnect). A batch the dataset fails to
build ends nothing: it is sent as an error frame in its place. Whatever a stream
holds is given back when it ends, however it ends; one stream's failure never
touches another.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc

from batchferry import wire
from batchferry.errors import DATASET_ERROR_KEY
from batchferry.layout import batch_bytes_hint, describe
from batchferry.v1 import loader_pb2 as _pb2

from .auth import Tokens, identity, is_loopback_peer
from .builder import Builder, Counters
from .config import ServerConfig
from .credits import ClientMessages
from .framing import END
from .iterators import is_iterable
from .jobs import Consumer, Job, JobConflict, JobRegistry, TooManyJobs
from .metrics import Metrics
from .modes import sender_for
from .orders import Orders
from .plan import MAX_NAME, Catalog, Plan, plan
from .ring import Owner, SlotRing
from .samples import check_sample_bytes, sample_plan, take_sample
from .status import Abort, StreamGone, invalid
from .stream import GroupHistory, GroupSize, Stream
from .workers import WorkerPool

__all__ = ["LoaderService"]

log = logging.getLogger("batchferry.server")

# After the last batch, how long a same-host client may take to release its slots.
_RELEASE_TIMEOUT = 60.0
_MIN_SHARE = 4
# gRPC may end a cancelled call's request iterator before it marks the call inactive:
# how long to look again before taking a client that stopped sending, slots held, as
# one that half-closed (its slots then linger) rather than one that left (they go now).
_GONE_WAIT = 0.5


class LoaderService:
    def __init__(
        self,
        datasets: dict[str, Any],
        collates: frozenset[str],
        pool: WorkerPool,
        ring: SlotRing,
        jobs: JobRegistry,
        orders: Orders,
        tokens: Tokens,
        config: ServerConfig,
        *,
        server_id: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._ring = ring
        self._jobs = jobs
        self._orders = orders
        self._tokens = tokens
        self._config = config
        self._server_id = server_id
        self.catalog = Catalog(
            lengths={name: _length(ds) for name, ds in datasets.items()},
            collates=collates,
            chunk_bytes=config.chunk_bytes,
            replica=config.replica_index,
            replicas=config.num_replicas,
            iterables=frozenset(name for name, ds in datasets.items() if is_iterable(ds)),
            max_iterators=config.max_iterators,
        )
        # Streams are counted here rather than by gRPC's maximum_concurrent_rpcs, so
        # that health checks and listings are still answered while every slot is taken.
        self._admission = threading.Lock()
        self._streams = 0
        self._per_peer: Counter[str] = Counter()
        self._closing = threading.Event()
        self._samples = {name: _first_sample(ds) for name, ds in datasets.items()}
        self._groups = GroupHistory()
        self._stream_ids = itertools.count(1)  # names each stream's ring account
        self._infos = [
            _pb2.DatasetInfo(
                name=name,
                length=_length(ds),
                iterable=is_iterable(ds),
                sized=not is_iterable(ds) or _sized(ds),
                sample_structure=(
                    describe(self._samples[name]) if self._samples[name] is not None else "(unavailable)"
                ),
            )
            for name, ds in sorted(datasets.items())
        ]
        self.metrics = metrics or Metrics()
        self.counters = Counters(observe=self.metrics.built)

    @property
    def batches_built(self) -> int:
        return self.counters.built

    @property
    def batches_gathered(self) -> int:
        return self.counters.gathered

    @property
    def open_streams(self) -> int:
        with self._admission:
            return self._streams

    def handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "ListDatasets": grpc.unary_unary_rpc_method_handler(self.list_datasets),
                "StreamBatches": grpc.stream_stream_rpc_method_handler(self.stream_batches),
                "ListJobs": grpc.unary_unary_rpc_method_handler(self.list_jobs),
                "GetSample": grpc.unary_unary_rpc_method_handler(self.get_sample),
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
            num_workers=self._config.num_workers,
        ).SerializeToString()

    def list_jobs(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            wire.parse(_pb2.ListJobsRequest, request)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # Who trains where is shown to callers who proved who they are (or on this host).
        show_peers = identity(context, self._tokens)[1] or is_loopback_peer(context)
        infos = []
        for job in self._jobs.jobs():
            with job.cond:
                consumers = [
                    _pb2.ConsumerInfo(
                        peer=c.peer if show_peers else "(hidden)",
                        rank=c.rank,
                        epoch=c.epoch,
                        batches_sent=c.sent,
                        num_batches=c.total,
                        batches_taken=c.taken,
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
                    epoch=job.epoch,
                    worlds=[_pb2.JobWorld(world_size=w, epoch=e) for w, e in job.worlds],
                )
            )
        return _pb2.ListJobsResponse(jobs=infos).SerializeToString()

    def get_sample(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._admitted(context):
            ticket = self._pool.open_stream()
            try:
                req = wire.parse(_pb2.GetSampleRequest, request)
                if len(req.dataset) > MAX_NAME:
                    raise invalid(f"dataset: at most {MAX_NAME} characters, got {len(req.dataset)}")
                if req.dataset in self.catalog.iterables:
                    raise invalid(
                        f"dataset {req.dataset!r} is an IterableDataset: it has no samples by index "
                        "(iterate a loader instead)"
                    )
                the_plan = sample_plan(req, self.catalog.lengths)
                self._check_size(the_plan)
                check_sample_bytes(self._size_hint(the_plan))
                builder = self._builder(the_plan, None, None, lambda: bool(context.is_active()), ticket)
                return take_sample(builder, req.index).SerializeToString()
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Abort as exc:
                context.abort(exc.code, exc.details)
            except StreamGone:
                context.abort(grpc.StatusCode.CANCELLED, "the call ended before its sample was built")
            finally:
                self._pool.close_stream(ticket)  # its build, if not started yet, is skipped
        raise AssertionError("unreachable: context.abort raises")

    # -- StreamBatches ----------------------------------------------------------------
    def stream_batches(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._admitted(context) as peer:
            try:
                yield from self._stream(requests, context, peer)
            except StreamGone:
                if self._closing.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            except Abort as exc:
                if exc.dataset_error:
                    context.set_trailing_metadata(((DATASET_ERROR_KEY, "1"),))
                context.abort(exc.code, exc.details)

    @contextlib.contextmanager
    def _admitted(self, context: grpc.ServicerContext) -> Iterator[str]:
        """Hold one of the caller's stream slots for the call (its peer name), or end the call
        with why not. Every call that builds counts: a stream, and a GetSample."""
        peer = identity(context, self._tokens)[0]
        refusal = self._admit(peer)
        if refusal is not None:
            context.abort(*refusal)
        try:
            yield peer
        finally:
            with self._admission:
                self._streams -= 1
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]

    def _admit(self, peer: str) -> tuple[grpc.StatusCode, str] | None:
        """Take a stream slot for ``peer``, or say why not. The one place streams are counted."""
        cfg = self._config
        with self._admission:
            if self._closing.is_set():
                return grpc.StatusCode.UNAVAILABLE, "server is shutting down"
            if self._streams >= cfg.max_streams:
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server already serves max_streams={cfg.max_streams} streams; "
                    "raise --max-streams or add replicas",
                )
            if self._per_peer[peer] >= cfg.max_streams_per_peer:
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this client ({peer}) already has max_streams_per_peer={cfg.max_streams_per_peer} "
                    "streams open; close loaders it no longer uses (a byte-stream loader opens "
                    "streams= of them per server: ask for fewer)",
                )
            self._streams += 1
            self._per_peer[peer] += 1
        return None

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext, peer: str) -> Iterator[bytes]:
        cfg = self._config
        messages = ClientMessages(requests, cfg.stream_idle_s)
        try:
            try:
                request = messages.open_message()
            except ValueError as exc:
                if messages.idle:
                    raise Abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
                raise invalid(str(exc)) from None
            try:
                the_plan = plan(request, self.catalog)
            except (Abort, StreamGone):
                raise
            except Exception as exc:  # anything plan() did not foresee is still the request's fault
                log.warning("open message refused by an unforeseen error", exc_info=True)
                raise invalid(f"open: {type(exc).__name__}: {exc}"[:300]) from None
            self._check_size(the_plan)
            order = self._orders.open(the_plan)
            try:
                yield from self._run(the_plan, order, messages, context, peer)
            finally:
                self._orders.close(order)
        finally:
            messages.close(client_gone=_client_gone(context, messages))

    def _run(
        self,
        the_plan: Plan,
        order: Any,
        messages: ClientMessages,
        context: grpc.ServicerContext,
        peer: str,
    ) -> Iterator[bytes]:
        def active() -> bool:
            return not self._closing.is_set() and bool(context.is_active())

        job: Job | None = None
        consumer: Consumer | None = None
        if the_plan.settings is not None:
            try:
                job, consumer = self._jobs.join(
                    the_plan.job, the_plan.settings, peer, the_plan.rank, the_plan.epoch
                )
            except JobConflict as exc:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            except TooManyJobs as exc:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            consumer.total = the_plan.local_total
            consumer.sent = the_plan.local_start
            taker = consumer
            messages.on_credit.append(lambda taken: setattr(taker, "taken", taken))
        messages.start(the_plan.credits)
        number = next(self._stream_ids)
        # Metrics name it without the peer (labels stay free of addresses); the log says who.
        log.debug("stream %d: %s reads %s", number, peer, the_plan.dataset)
        owner = self._ring.open_owner(f"{number} {the_plan.dataset}")
        ticket = self._pool.open_stream()
        # Client-chosen batches (a batch_sampler) come with batch_size 1 but are any size.
        group_key = (the_plan.dataset, the_plan.collate, the_plan.batch_size, the_plan.client_batches)
        stream = Stream(
            plan=the_plan,
            order=order,
            messages=messages,
            builder=self._builder(the_plan, order, job, active, ticket, owner),
            active=active,
            ring_slots=self._ring.target_slots,
            share=self._share,
            hold_share=self._ring.hold_share,
            workers=max(1, self._pool.num_workers),
            group=GroupSize(
                min(self._config.group_bytes, self._ring.max_bytes // self._ring.target_slots)
                if the_plan.groups
                else 0,
                seed=self._groups.get(group_key),
            ),
            job=job,
            consumer=consumer,
            observe=self.metrics.sends(the_plan),
        )
        try:
            complete = yield from sender_for(the_plan)(stream)
            self._check_client(messages)
            if not complete and not messages.stopped:
                if self._closing.is_set():
                    raise StreamGone
                return
            yield END
            # Same host: the client releases the last slots, then half-closes.
            messages.wait_released(min(_RELEASE_TIMEOUT, self._config.stream_idle_s), active)
            self._check_client(messages)
        finally:
            self._pool.close_stream(ticket)  # its builds not yet started are skipped
            self._ring.close_owner(owner)
            self._groups.put(group_key, stream.group.state())
            if job is not None and consumer is not None:
                self._jobs.leave(job, consumer)

    def _share(self) -> int:
        """Slots one stream may take now: the ring split among the open streams (at least 4)."""
        return max(_MIN_SHARE, self._ring.max_slots // max(1, self.open_streams))

    def _check_client(self, messages: ClientMessages) -> None:
        if messages.error is not None:
            raise invalid(messages.error)
        if messages.idle:
            raise Abort(
                grpc.StatusCode.UNAVAILABLE,
                f"stream idle: nothing from the client for stream_idle_s={self._config.stream_idle_s:g}s; "
                "the loader reconnects when it reads again",
            )

    def _check_size(self, the_plan: Plan) -> None:
        """Refuse, before any build, a batch the estimate says is larger than max_batch_bytes."""
        need = self._size_hint(the_plan)
        if need > self._config.max_batch_bytes:
            rows = the_plan.batch_size if the_plan.iterable else min(the_plan.batch_size, the_plan.length)
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a batch of {rows} samples of this dataset takes about "
                f"{need} bytes, above the server's max_batch_bytes={self._config.max_batch_bytes}; "
                "use a smaller batch_size (or shorter rows: the pack collate's seq_len)",
            )

    def _builder(
        self,
        the_plan: Plan,
        order: Any,
        job: Job | None,
        active: Any,
        ticket: tuple[int, int],
        owner: Owner | None = None,
    ) -> Builder:
        def count_for_job(batches: int) -> None:
            if job is not None:
                job.batches_built += batches

        return Builder(
            the_plan,
            order,
            self._ring,
            self._pool,
            self.counters,
            active,
            min_bytes=min(self._size_hint(the_plan), self._ring.max_bytes // self._ring.target_slots),
            max_bytes=self._config.max_batch_bytes,
            acquire_timeout=self._config.slot_timeout_s,
            ticket=ticket,
            owner=owner or Owner(""),
            on_built=count_for_job,
        )

    def _size_hint(self, the_plan: Plan) -> int:
        """Bytes a batch of this stream takes, estimated from sample 0 (0 when unreadable)."""
        sample = self._samples.get(the_plan.dataset)
        rows = the_plan.batch_size if the_plan.iterable else min(the_plan.batch_size, the_plan.length)
        return batch_bytes_hint(sample, rows) if sample is not None else 0


def _sized(ds: Any) -> bool:
    try:
        len(ds)
    except TypeError:
        return False
    return True


def _length(ds: Any) -> int:
    """The dataset's length; 0 for an IterableDataset without ``__len__``."""
    return len(ds) if _sized(ds) else 0


def _first_sample(ds: Any) -> Any:
    """Sample 0 (an IterableDataset's first item), to describe the dataset and size its
    batches; None if unreadable."""
    try:
        if is_iterable(ds):
            return next(iter(ds), None)
        if len(ds) == 0:
            return None
        return ds[0]
    except Exception:
        log.warning("reading sample 0 failed; batches will size their slots on first use", exc_info=True)
        return None


def _client_gone(context: grpc.ServicerContext, messages: ClientMessages) -> bool:
    """Whether the client cancelled the call or went away, rather than half-closing it."""
    deadline = time.monotonic() + _GONE_WAIT
    while context.is_active():
        if messages.cancelled:
            return True
        if not (messages.ended and messages.held) or time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True
