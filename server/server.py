"""The loader server: datasets, worker pool, shared-memory ring and gRPC, with one close().

Start order matters: workers are spawned before any gRPC object exists (gRPC's
threads do not survive process creation), then the ring, then the gRPC server.
close() undoes it in reverse: report NOT_SERVING, stop RPCs, stop workers, unlink
every segment.

Besides the Loader service the server answers the standard ``grpc.health.v1``
service (container HEALTHCHECK, Kubernetes gRPC probes, ``batchferry health``):
SERVING for "" and the Loader service while it runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from batchferry import shm, wire

from .collate import CollateFn, SlotCollate, collate_names, get_collate
from .config import ServerConfig
from .datasets import DatasetSource, MapDataset, parse_spec
from .jobs import JobRegistry
from .ring import SlotRing
from .service import LoaderService
from .workers import WorkerPool

__all__ = ["Server", "ServerConfig"]

log = logging.getLogger("batchferry.server")

# RPC threads beyond max_streams: health checks, listings, refused streams.
_SPARE_RPCS = 8


class Server:
    """Serve map-style datasets to batchferry clients.

    >>> from batchferry.server import Server
    >>> with Server({"train": dataset}, port=0, num_workers=2) as srv:  # doctest: +SKIP
    ...     print(srv.address)

    ``datasets`` maps names to map-style datasets (objects are pickled to the
    worker processes) or to spec strings (``"npy:/data/x.npy"``, see
    :mod:`batchferry.server.datasets`). ``collates`` adds named collate functions
    to the built-in ``default`` and ``pad``.
    """

    def __init__(
        self,
        datasets: Mapping[str, MapDataset | str],
        *,
        collates: Mapping[str, SlotCollate | CollateFn] | None = None,
        config: ServerConfig | None = None,
        **options: Any,
    ) -> None:
        self.config = replace(config or ServerConfig(), **options)
        if not datasets:
            raise ValueError("datasets: give the server at least one dataset")
        self._closed = threading.Event()
        self._pool: WorkerPool | None = None
        self._ring: SlotRing | None = None
        self._grpc: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        sources: dict[str, DatasetSource] = {}
        built: dict[str, MapDataset] = {}
        for name, ds in datasets.items():
            if not name or not isinstance(name, str):
                raise ValueError(f"dataset names must be non-empty strings, got {name!r}")
            if isinstance(ds, str):
                sources[name], built[name] = DatasetSource(spec=ds), parse_spec(ds)
            elif isinstance(ds, MapDataset):
                sources[name], built[name] = DatasetSource(obj=ds), ds
            else:
                raise TypeError(f"dataset {name!r} is a {type(ds).__name__}, not a map-style dataset")
        registry = {name: get_collate(name) for name in collate_names()}
        for name, fn in (collates or {}).items():
            if not callable(fn):
                raise TypeError(f"collate {name!r} must be callable")
            registry[name] = fn
        removed = shm.remove_stale()
        if removed:
            log.warning("removed %d shared-memory segment(s) left by a stopped server", len(removed))
        try:
            # Workers keep a mapping per slot; the ring may add slots under load.
            self._pool = WorkerPool(sources, registry, self.config.num_workers, 4 * self.config.num_slots)
            self._ring = SlotRing(self.config.num_slots, self.config.shm_bytes)
            self.jobs = JobRegistry(self.config.job_idle_s)
            self.service = LoaderService(
                built,
                registry,
                self._pool,
                self._ring,
                self.config.chunk_bytes,
                self.jobs,
                max_streams=self.config.max_streams,
                replica_index=self.config.replica_index,
                num_replicas=self.config.num_replicas,
            )
            # Streams are limited by the service itself; the spare threads keep health
            # checks and listings answered while every stream slot is taken.
            self._grpc = grpc.server(
                ThreadPoolExecutor(
                    self.config.max_streams + _SPARE_RPCS, thread_name_prefix="batchferry-rpc"
                ),
                handlers=[self.service.handlers()],
                options=wire.CHANNEL_OPTIONS,
                maximum_concurrent_rpcs=self.config.max_streams + _SPARE_RPCS,
            )
            self._health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
            self.port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.port}")
            if self.port == 0:
                raise OSError(f"could not bind {self.config.host}:{self.config.port}")
            self._grpc.start()
            for service in ("", wire.SERVICE):
                self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            self.close()
            raise
        replica = (
            f" as replica {self.config.replica_index} of {self.config.num_replicas}"
            if self.config.num_replicas > 1
            else ""
        )
        log.info(
            "serving %s on %s with %d worker(s)%s",
            ", ".join(built),
            self.address,
            self.config.num_workers,
            replica,
        )

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def segment_names(self) -> list[str]:
        return self._ring.segment_names() if self._ring is not None else []

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server is closed (True) or ``timeout`` passes (False)."""
        return self._closed.wait(timeout)

    def close(self, grace: float = 1.0) -> None:
        """Stop serving, stop the workers and unlink all shared memory. Idempotent."""
        if self._health is not None:
            self._health.enter_graceful_shutdown()  # probes see NOT_SERVING during the grace
            self._health = None
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
            self._grpc = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._closed.set()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ring", None) is not None:
            self.close(grace=0)
