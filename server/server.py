"""The loader server: datasets, worker pool, shared-memory ring and gRPC, with one close().

Start order matters: workers are spawned before any gRPC object exists (gRPC's
threads do not survive process creation), then the ring, then the gRPC server.
close() undoes it in reverse: report NOT_SERVING, end every stream with
UNAVAILABLE (clients reconnect), stop RPCs, stop workers, unlink every segment.

Besides the Loader service the server answers the standard ``grpc.health.v1``
service (container HEALTHCHECK, Kubernetes gRPC probes, ``batchferry health``):
SERVING for "" and the Loader service while it runs; and server reflection
(``grpc.reflection.v1alpha``), so ``grpcurl HOST:PORT list`` and ``describe`` work.
With ``metrics_port`` it serves Prometheus metrics over HTTP (``server/metrics.py``).

Nothing outlives the server: ``close()`` (also at interpreter exit, and on
SIGTERM/SIGINT while :meth:`Server.wait` runs in the main thread) unlinks the
ring, and if the process is killed outright the ring's reaper process does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import resource
import signal
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import replace
from types import FrameType
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from torch.utils.data import IterableDataset

from batchferry import cleanup, shm, wire
from batchferry.v1 import loader_pb2 as _pb2

from . import compression
from .auth import AuthInterceptor, Tokens, server_credentials
from .collate import CollateFn, SlotCollate, collate_names, get_collate
from .config import ServerConfig
from .datasets import DatasetSource, MapDataset
from .iterators import is_iterable
from .jobs import JobRegistry
from .journal import StateDir
from .metrics import Metrics
from .orders import Orders
from .ring import SlotRing
from .servicer import LoaderService
from .sources._remote import StorageSettings
from .workers import WorkerPool

__all__ = ["Server", "ServerConfig"]

log = logging.getLogger("batchferry.server")

# RPC threads beyond max_streams: health checks, listings, refused streams.
_SPARE_RPCS = 8
_STOP_TIMEOUT = 10.0


class Server:
    """Serve map-style datasets and IterableDatasets (docs/iterable.md) to batchferry clients.

    Examples:
        >>> from batchferry.server import Server
        >>> with Server({"train": dataset}, port=0, num_workers=2) as srv:  # doctest: +SKIP
        ...     print(srv.address)

    ``datasets`` maps names to map-style datasets or IterableDatasets (objects are
    pickled to the worker processes) or to spec strings (``"npy:/data/x.npy"``, see
    :mod:`batchferry.server.datasets`). ``collates`` adds named collate functions
    to the built-in ``default``, ``pad``, ``pack`` and ``convert``.
    """

    def __init__(
        self,
        datasets: Mapping[str, MapDataset | IterableDataset[Any] | str],
        *,
        collates: Mapping[str, SlotCollate | CollateFn] | None = None,
        config: ServerConfig | None = None,
        **options: Any,
    ) -> None:
        self.config = replace(config or ServerConfig(), **options)
        if not datasets:
            raise ValueError("datasets: give the server at least one dataset")
        compression.min_ratio()  # a bad BATCHFERRY_COMPRESSION_MIN_RATIO fails the start, not a stream
        self.id = uuid.uuid4().hex
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._pool: WorkerPool | None = None
        self._ring: SlotRing | None = None
        self._grpc: grpc.Server | None = None
        self._health_grpc: grpc.Server | None = None
        self._threads: list[_DaemonThreads] = []
        self.port = self.health_port = self.metrics_port = 0
        self.metrics = Metrics()
        self._health: health.HealthServicer | None = None
        self.service: LoaderService | None = None
        sources: dict[str, DatasetSource] = {}
        built: dict[str, Any] = {}
        storage = StorageSettings.of(self.config)  # for specs that name files in object storage
        for name, ds in datasets.items():
            if not name or not isinstance(name, str):
                raise ValueError(f"dataset names must be non-empty strings, got {name!r}")
            if isinstance(ds, str):
                sources[name] = DatasetSource(spec=ds, storage=storage)  # built below
            elif isinstance(ds, MapDataset) or is_iterable(ds):
                sources[name], built[name] = DatasetSource(obj=ds), ds
            else:
                kind = type(ds).__name__
                raise TypeError(f"dataset {name!r} is a {kind}, not a map-style or an IterableDataset")
        registry = {name: get_collate(name) for name in collate_names()}
        for name, fn in (collates or {}).items():
            if not callable(fn):
                raise TypeError(f"collate {name!r} must be callable")
            registry[name] = fn
        cfg = self.config
        # Settings that read files fail here, naming the setting, before anything starts.
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        tokens = Tokens(cfg.tokens.split(","), cfg.token_file or None)
        state = StateDir(cfg.state_dir, cfg.max_jobs) if cfg.state_dir else None
        removed = shm.remove_stale()
        if removed:
            log.warning("removed %d shared-memory segment(s) left by a stopped server", len(removed))
        _raise_fd_limit()
        cleanup.start()
        cleanup.close_at_exit(self)
        try:
            max_slots = 4 * cfg.num_slots
            # Workers keep a mapping per slot; the ring may add slots under load. They
            # import while this process builds the datasets (listings, downloads), then
            # load theirs from what that left.
            self._pool = WorkerPool(sources, registry, cfg.num_workers, max_slots, start=False)
            built = {n: built[n] if n in built else source.build() for n, source in sources.items()}
            self._pool.start()
            self._ring = SlotRing(
                cfg.num_slots, _shm_budget(cfg.shm_bytes), max_slots=max_slots, linger=cfg.linger_s
            )
            self.jobs = JobRegistry(cfg.job_idle_s, cfg.max_jobs, state, cfg.rejoin_s)
            self.service = LoaderService(
                built,
                frozenset(registry),
                self._pool,
                self._ring,
                self.jobs,
                Orders(cfg.max_index_bytes),
                tokens,
                cfg,
                server_id=self.id,
                metrics=self.metrics,
            )
            self.metrics.watch(ring=self._ring, pool=self._pool, jobs=self.jobs, service=self.service)
            self._ring.on_wait = lambda _owner, seconds, _by: self.metrics.slot_waited(seconds)
            # Streams are limited by the service itself; the spare threads keep health
            # checks and listings answered while every stream slot is taken.
            self._threads = [_DaemonThreads(cfg.max_streams + _SPARE_RPCS), _DaemonThreads(_SPARE_RPCS)]
            # Outermost first: the metrics count every call, refused ones too.
            interceptors = [
                self.metrics.interceptor(),
                *([AuthInterceptor(tokens)] if tokens.enabled else []),
            ]
            self._grpc = grpc.server(
                self._threads[0],
                handlers=[self.service.handlers()],
                interceptors=interceptors,
                options=wire.SERVER_OPTIONS,
                maximum_concurrent_rpcs=cfg.max_streams + _SPARE_RPCS,
            )
            self._health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            reflection.enable_server_reflection(
                (wire.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc, pool=_descriptors()
            )
            self.port = _bind(self._grpc, cfg.host, cfg.port, credentials)
            if cfg.metrics_port:
                self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
            if cfg.health_port:
                # Probes that speak no TLS (kubelet's gRPC probe) ask here: health only.
                self._health_grpc = grpc.server(self._threads[1], maximum_concurrent_rpcs=_SPARE_RPCS)
                health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_grpc)
                self.health_port = _bind(self._health_grpc, cfg.host, cfg.health_port, None)
                self._health_grpc.start()
            self._grpc.start()
            for service in ("", wire.SERVICE):
                self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            self.close()
            if state is not None:
                state.close()  # the registry that owns it may not exist yet
            raise
        replica = f" as replica {cfg.replica_index} of {cfg.num_replicas}" if cfg.num_replicas > 1 else ""
        log.info(
            "serving %s on %s with %d worker(s)%s", ", ".join(built), self.address, cfg.num_workers, replica
        )
        if not _loopback(cfg.host) and credentials is None and not tokens.enabled:
            log.warning(
                "listening on %s without TLS or tokens: anyone who can reach it can read every dataset; "
                "set tls_cert/tls_key and token_file (see Security in docs/deploy.md)",
                self.address,
            )

    @property
    def address(self) -> str:
        return _join(self.config.host, self.port)

    @property
    def ring(self) -> SlotRing:
        if self._ring is None:
            raise RuntimeError("server is closed")
        return self._ring

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            raise RuntimeError("server is closed")
        return self._pool

    def segment_names(self) -> list[str]:
        return self._ring.segment_names() if self._ring is not None else []

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server is closed (True) or ``timeout`` passes (False).

        In the main thread, SIGTERM and SIGINT close the server meanwhile (as
        ``batchferry serve`` does), so a container stop or Ctrl-C leaves nothing behind.
        """
        if threading.current_thread() is not threading.main_thread():
            return self._closed.wait(timeout)
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            # Short waits: a signal handler runs only between them.
            remaining = timeout
            while not self._closed.is_set() and not stop.is_set():
                if remaining is not None and remaining <= 0:
                    return False
                step = 0.2 if remaining is None else min(0.2, remaining)
                self._closed.wait(step)
                if remaining is not None:
                    remaining -= step
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stop.is_set():
            self.close()
        return True

    def close(self, grace: float = 1.0) -> None:
        """Stop serving, stop the workers and unlink all shared memory. Idempotent."""
        with self._close_lock:
            if self._health is not None:
                self._health.enter_graceful_shutdown()  # probes see NOT_SERVING from now on
                self._health = None
            if self.service is not None:
                self.service.shutdown()  # every stream ends with UNAVAILABLE: clients reconnect
            for server in (self._grpc, self._health_grpc):
                if server is not None:
                    server.stop(grace).wait(_STOP_TIMEOUT)
            self._grpc = self._health_grpc = None
            self.metrics.close()
            jobs: JobRegistry | None = getattr(self, "jobs", None)  # None: closed before it was made
            if jobs is not None:
                jobs.close()
            for threads in self._threads:
                threads.shutdown(wait=False)
            self._threads = []
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            self._closed.set()
            cleanup.forget_at_exit(self)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A finalizer must not wait: hand the clean-up over (at exit, atexit closed it).
        if getattr(self, "_ring", None) is not None:
            with contextlib.suppress(Exception):  # module globals may be gone at shutdown
                cleanup.later(self.close)


class _DaemonThreads(Executor):
    """gRPC's handler threads, as daemon threads.

    concurrent.futures' pool joins its threads at interpreter exit, so a stream left
    open by a script that ends without close() would hang it; these threads do not
    hold up exit (the server is closed at exit instead).
    """

    def __init__(self, max_workers: int) -> None:
        self._max = max_workers
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new RPCs after shutdown")
            self._work.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._run, name=f"batchferry-rpc_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del item, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            for _ in self._threads:
                self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join(timeout=_STOP_TIMEOUT)


def _descriptors() -> descriptor_pool.DescriptorPool:
    """The proto files of the services the server answers, for reflection.

    The Loader's handlers take raw bytes (see batchferry.wire), so gRPC knows nothing
    of its messages: reflection answers from this pool, which holds exactly these files.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (_pb2, health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    return pool


def _shm_budget(wanted: int) -> int:
    """``shm_bytes``, or what /dev/shm can hold if that is less (a container's default is 64 MB)."""
    try:
        room = shm.capacity()
    except OSError:
        return wanted
    if wanted > room:
        log.warning(
            "shm_bytes=%d is more than /dev/shm holds (%d bytes): using %d; give the container a "
            "larger /dev/shm (shm_size, or a memory-backed emptyDir) or lower --shm-bytes",
            wanted, room, room,
        )  # fmt: skip
        return room
    return wanted


def _bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = _join(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # gRPC raises this when the address is taken or invalid
        raise OSError(f"could not listen on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"could not listen on {address}")
    return int(bound)


def _loopback(host: str) -> bool:
    try:
        return bool(ipaddress.ip_address(host.strip("[]")).is_loopback)
    except ValueError:
        return host == "localhost"


def _join(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host}:{port}"


def _raise_fd_limit() -> None:
    """Each slot costs a few descriptors (the ring, workers, clients): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
