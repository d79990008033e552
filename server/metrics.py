"""Prometheus metrics of one server: what it builds and sends, its ring, workers, streams and jobs.

One :class:`Metrics` per :class:`~batchferry.server.Server`, with a registry of its own
(several servers may share a process). With ``metrics_port`` set, :meth:`Metrics.serve`
answers ``GET /metrics`` on the server's host.

Counters and histograms move through three hooks, each one line where it is called:

* ``Counters.observe`` (``server/builder.py``): every finished build;
* ``Stream.observe`` (``server/stream.py``): every batch's frames as gRPC takes them;
* :meth:`Metrics.interceptor` (``server/server.py``): every RPC's final status code.

Gauges of state the server keeps anyway (the ring, the worker pool, open streams,
jobs) are read when scraped, so they cost nothing between scrapes.

Labels stay bounded: ``dataset`` (the server's own), ``mode`` (4), ``transport``
(``shm``, ``grpc``), ``state`` (the ring's 4), registered gRPC methods and the 17 status
codes. A job's name (chosen by its clients) labels only scrape-time series, which
vanish with the job; so does a stream's name (``stream``, ``blocked_by``: its number
and dataset, at most max_streams of them) in the hoard gauges, which name who holds
the slots a stream waits for. Nothing is labelled by peer, port or batch.

>>> from prometheus_client import generate_latest
>>> metrics = Metrics()
>>> b"batchferry_batches_built_total" in generate_latest(metrics.registry)
True
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchferry import protocol

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .builder import Built
    from .jobs import JobRegistry
    from .plan import Plan
    from .ring import SlotRing
    from .servicer import LoaderService
    from .workers import Result, WorkerPool

__all__ = ["TRANSPORTS", "FramesObserver", "Metrics"]

TRANSPORTS = ("shm", "grpc")
# Worker time per batch: from a millisecond (a tiny gather) to half a minute (heavy decode).
_BUILD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# gRPC time per batch: a slot name on the same host, up to large batches over a slow link.
_SEND_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
_SLOT_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STOP_TIMEOUT = 5.0

# What a stream hands each batch's frames through: (frames, transport, batch) -> frames.
FramesObserver = Callable[[Iterator[bytes], str, "Built"], Iterator[bytes]]


@dataclass
class _Watched:
    """The server's parts that scrape-time gauges read (dropped when the server closes)."""

    ring: SlotRing
    pool: WorkerPool
    jobs: JobRegistry
    service: LoaderService


class Metrics:
    """A server's metrics: a registry, the instruments its hooks move, and the endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._built = Counter(
            "batchferry_batches_built", "Batches built into ring slots by the workers.",
            ["dataset", "mode"], registry=r,
        )  # fmt: skip
        self._build_seconds = Histogram(
            "batchferry_batch_build_seconds",
            "Worker time to fetch, collate and write one batch into its slot.",
            ["dataset"], buckets=_BUILD_BUCKETS, registry=r,
        )  # fmt: skip
        self._sent = Counter(
            "batchferry_batches_sent", "Batches sent to clients (a shared-mode batch once per consumer).",
            ["dataset", "mode", "transport"], registry=r,
        )  # fmt: skip
        self._failed = Counter(
            "batchferry_batches_failed",
            "Batches sent as the error the dataset raised building them (a shared-mode batch once per "
            "consumer).",
            ["dataset", "mode"], registry=r,
        )  # fmt: skip
        self._send_seconds = Histogram(
            "batchferry_batch_send_seconds",
            "Time from a batch's first frame to its last one taken by gRPC.",
            ["dataset", "transport"], buckets=_SEND_BUCKETS, registry=r,
        )  # fmt: skip
        self._sent_bytes = Counter(
            "batchferry_sent_bytes",
            "Bytes of batch frames written to gRPC streams (shm: headers naming slots; grpc: headers "
            "and payload chunks).",
            ["dataset", "mode", "transport"], registry=r,
        )  # fmt: skip
        self._batch_bytes = Counter(
            "batchferry_batch_bytes",
            "Payload bytes of the batches sent, by either transport.",
            ["dataset", "mode", "transport"], registry=r,
        )  # fmt: skip
        self._slot_wait = Histogram(
            "batchferry_slot_wait_seconds",
            "Time a stream was blocked for a ring slot (its first, or the next with none in flight).",
            buckets=_SLOT_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self._handled = Counter(
            "batchferry_grpc_handled",
            "RPCs completed, by method and gRPC status code (CANCELLED: the client went away).",
            ["grpc_service", "grpc_method", "grpc_code"], registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)
        self._state = _StateCollector()
        r.register(self._state)
        self._lock = threading.Lock()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.port = 0

    # -- what the server wires in --------------------------------------------------------
    def slot_waited(self, seconds: float) -> None:
        """A stream's blocked wait for a slot ended (``SlotRing.on_wait``)."""
        self._slot_wait.observe(seconds)

    def watch(self, *, ring: SlotRing, pool: WorkerPool, jobs: JobRegistry, service: LoaderService) -> None:
        """Read these at every scrape (until :meth:`close`)."""
        self._state.watched = _Watched(ring, pool, jobs, service)

    def serve(self, host: str, port: int) -> int:
        """Answer ``GET /metrics`` on ``host:port`` (plain HTTP); returns the port."""
        address = host.strip("[]")
        try:
            httpd, thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            raise OSError(
                f"could not listen on {host}:{port} for metrics_port: {exc.strerror or exc}"
            ) from None
        with self._lock:
            self._http = httpd, thread
        self.port = int(httpd.server_port)
        return self.port

    def close(self) -> None:
        """Stop the endpoint and forget the server's parts (the counters keep their values)."""
        with self._lock:
            http, self._http = self._http, None
        self._state.watched = None
        if http is not None:
            httpd, thread = http
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=_STOP_TIMEOUT)

    # -- hooks -------------------------------------------------------------------------
    def built(self, plan: Plan, result: Result) -> None:
        """A build finished (called on the worker pool's result thread)."""
        if result.layouts:
            self._built.labels(plan.dataset, plan.mode_name).inc(len(result.layouts))
        if result.status == "ok":  # a group: each of its batches took a share of its time
            histogram = self._build_seconds.labels(plan.dataset)
            for _ in result.layouts:
                histogram.observe(result.seconds / len(result.layouts))

    def sends(self, plan: Plan) -> FramesObserver:
        """The frames observer of one stream: counts each batch once its last frame is out (a
        batch that failed: as failed, once its error frame is out)."""
        mode = plan.mode_name
        children = {
            t: (
                self._sent.labels(plan.dataset, mode, t),
                self._sent_bytes.labels(plan.dataset, mode, t),
                self._batch_bytes.labels(plan.dataset, mode, t),
                self._send_seconds.labels(plan.dataset, t),
            )
            for t in TRANSPORTS
        }
        failed = self._failed.labels(plan.dataset, mode)

        def observe(frames: Iterator[bytes], transport: str, built: Built) -> Iterator[bytes]:
            if built.error is not None:  # a batch that failed: its error frame, nothing sent
                return _measured(frames, lambda _size, _took: failed.inc())
            sent, wire, payload, seconds = children[transport]

            def done(size: int, took: float) -> None:
                sent.inc(built.count)
                wire.inc(size)
                payload.inc(built.payload_bytes)
                for _ in range(built.count):  # a frame of a group: a share each
                    seconds.observe(took / built.count)

            return _measured(frames, done)

        return observe

    def interceptor(self) -> grpc.ServerInterceptor:
        """Counts every RPC by method and final status code (outermost: sees refusals too)."""
        return _HandledInterceptor(self._handled)


def _measured(frames: Iterator[bytes], done: Callable[[int, float], None]) -> Iterator[bytes]:
    """``frames`` as they are; ``done(bytes, seconds)`` once gRPC has taken the last one.

    A batch whose stream ends before its last frame is not counted.
    """
    size = 0
    start: float | None = None
    try:
        for frame in frames:
            if start is None:
                start = time.perf_counter()
            size += len(frame)
            yield frame
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()  # byte_frames gives its slot back in a finally
    if start is not None:
        done(size, time.perf_counter() - start)


class _StateCollector(Collector):
    """Gauges read from the server's state at each scrape."""

    def __init__(self) -> None:
        self.watched: _Watched | None = None

    def collect(self) -> Iterable[Metric]:
        w = self.watched
        if w is None:
            return
        stats = w.ring.stats()
        slots = GaugeMetricFamily("batchferry_ring_slots", "Ring slots by state.", labels=["state"])
        size = GaugeMetricFamily(
            "batchferry_ring_bytes", "Shared memory of the ring's slots by state.", labels=["state"]
        )
        for state, count in stats.slots.items():
            slots.add_metric([state.value], count)
            size.add_metric([state.value], stats.bytes.get(state, 0))
        yield slots
        yield size
        yield GaugeMetricFamily(
            "batchferry_ring_budget_bytes", "The shared-memory budget of every segment (shm_bytes).",
            value=stats.max_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "batchferry_ring_kept_bytes",
            "Shared memory of slots out of the ring that clients still map (kept or reclaimed batches).",
            value=stats.kept_bytes,
        )  # fmt: skip
        yield CounterMetricFamily(
            "batchferry_slots_reclaimed",
            "Held slots taken out of the ring for a waiting stream (their clients keep the batches).",
            value=w.ring.reclaimed_total,
        )  # fmt: skip
        yield from _hoard_families(w.ring)
        yield GaugeMetricFamily("batchferry_workers", "Worker processes.", value=w.pool.num_workers)
        yield CounterMetricFamily(
            "batchferry_worker_restarts", "Worker processes replaced after dying.", value=w.pool.restarts
        )
        yield CounterMetricFamily(
            "batchferry_worker_tasks_skipped",
            "Builds skipped because the stream that wanted them had ended.", value=w.pool.cancelled,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "batchferry_streams_open", "StreamBatches calls open.", value=w.service.open_streams
        )
        yield from _job_families(w.jobs)


def _hoard_families(ring: SlotRing) -> Iterator[Metric]:
    """Per open stream (series vanish with it): the slots its client holds, and for a
    stream blocked for a slot, how long so far and the stream holding the most."""
    held = GaugeMetricFamily(
        "batchferry_stream_slots_held", "Slots an open stream's client holds mapped.", labels=["stream"]
    )
    waiting = GaugeMetricFamily(
        "batchferry_stream_slot_wait_seconds",
        "How long an open stream has been blocked for a slot so far; blocked_by: the stream whose "
        "client held the most slots meanwhile.",
        labels=["stream", "blocked_by"],
    )
    now = time.monotonic()
    for owner in ring.owners():
        if owner.held:
            held.add_metric([owner.label], owner.held)
        since = owner.waiting_since
        if since is not None:
            waiting.add_metric([owner.label, owner.blocked_by], now - since)
    yield held
    yield waiting


def _job_families(registry: JobRegistry) -> Iterator[Metric]:
    consumers = GaugeMetricFamily(
        "batchferry_job_consumers", "Consumers of a job now.", labels=["job", "mode", "dataset"]
    )
    built = CounterMetricFamily(
        "batchferry_job_batches_built", "Batches built for a job while it has existed.", labels=["job"]
    )
    lag = GaugeMetricFamily(
        "batchferry_job_consumer_lag_batches",
        "Batches a consumer has taken into its training loop fewer than the job's furthest one "
        "(epochs counted). consumer: its place among the job's consumers of that rank, in the order "
        "they joined.",
        labels=["job", "rank", "consumer"],
    )
    epoch = GaugeMetricFamily(
        "batchferry_job_epoch", "The newest epoch a consumer of a job has opened.", labels=["job"]
    )
    world = GaugeMetricFamily(
        "batchferry_job_world_size", "The world size a job runs in now (ranks or consumers).", labels=["job"]
    )
    resizes = CounterMetricFamily(
        "batchferry_job_resizes", "Times a job came back in another world size.", labels=["job"]
    )
    for job in registry.jobs():
        with job.cond:
            members = sorted(job.consumers.values(), key=lambda c: (c.rank, c.id))
            per_epoch = max((c.total for c in members), default=0)
            positions = [c.epoch * per_epoch + c.taken for c in members]
            built_count = job.batches_built
            resized = job.resizes
        mode = protocol.MODE_NAMES.get(job.settings.mode, "unknown")
        consumers.add_metric([job.name, mode, job.settings.dataset], len(members))
        built.add_metric([job.name], built_count)
        epoch.add_metric([job.name], job.epoch)
        world.add_metric([job.name], job.settings.world_size)
        resizes.add_metric([job.name], resized)
        front = max(positions, default=0)
        seen: dict[int, int] = {}
        for c, position in zip(members, positions, strict=True):
            index = seen[c.rank] = seen.get(c.rank, -1) + 1
            lag.add_metric([job.name, str(c.rank), str(index)], front - position)
    yield consumers
    yield built
    yield lag
    yield epoch
    yield world
    yield resizes


class _HandledInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, handled: Counter) -> None:
        self._handled = handled

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:  # gRPC answers UNIMPLEMENTED; the name is the caller's, not a label
            self._handled.labels("unknown", "unknown", grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        service, _, method = str(details.method).lstrip("/").rpartition("/")
        count = self._handled.labels

        def finished(context: grpc.ServicerContext, default: grpc.StatusCode) -> None:
            code = context.code() or default
            count(service, method, code.name).inc()

        return _wrap(handler, finished)


def _wrap(
    handler: grpc.RpcMethodHandler, finished: Callable[[grpc.ServicerContext, grpc.StatusCode], None]
) -> grpc.RpcMethodHandler:
    """``handler`` with ``finished(context, code if none was set)`` called as its call ends."""
    OK, UNKNOWN, CANCELLED = grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = behaviour(request, context)
            except BaseException:
                finished(context, UNKNOWN)
                raise
            finished(context, OK)
            return response

        return call

    def streaming(behaviour: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            ended = False
            try:
                yield from behaviour(request, context)
            except GeneratorExit:  # gRPC dropped the call: the client went away
                ended = True
                finished(context, CANCELLED)
                raise
            except BaseException:
                ended = True
                finished(context, UNKNOWN)
                raise
            finally:
                if not ended:
                    finished(context, OK if context.is_active() else CANCELLED)

        return call

    kind = (handler.request_streaming, handler.response_streaming)
    make, behaviour = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }[kind]
    wrapped = streaming(behaviour) if handler.response_streaming else unary(behaviour)
    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
