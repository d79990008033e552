"""The loader server: datasets, worker pool, shared-memory ring and gRPC, with one close().

Start order matters: workers are spawned before any gRPC object exists (gRPC's
threads do not survive process creation), then the ring, then the gRPC server.
close() undoes it in reverse: stop RPCs, stop workers, unlink every segment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import grpc

from batchferry import shm, wire

from .collate import CollateFn, SlotCollate, collate_names, get_collate
from .datasets import DatasetSource, MapDataset, parse_spec
from .jobs import JobRegistry
from .ring import SlotRing
from .service import LoaderService
from .workers import WorkerPool

__all__ = ["Server", "ServerConfig"]

log = logging.getLogger("batchferry.server")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Everything a server is configured with (CLI flags map 1:1 onto these)."""

    host: str = "127.0.0.1"
    port: int = 50051
    num_workers: int = 2
    # Ring slots; 0 picks 4 per worker plus 4 (at least 8).
    slots: int = 0
    # Upper bound on the ring's shared memory, all slots together.
    shm_bytes: int = 4 << 30
    chunk_bytes: int = wire.DEFAULT_CHUNK_BYTES
    max_streams: int = 64
    # A job with no consumers for this long is forgotten (its settings no longer bind).
    job_idle_s: float = 300.0
    # Scale-out across replicas (replica i serves batches b % R == i) is not built yet.
    replica_index: int = 0
    num_replicas: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.slots < 0:
            raise ValueError(f"slots must be >= 0, got {self.slots}")
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if not wire.MIN_CHUNK_BYTES <= self.chunk_bytes <= wire.MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}], "
                f"got {self.chunk_bytes}"
            )
        if self.num_replicas < 1 or not 0 <= self.replica_index < self.num_replicas:
            raise ValueError(
                f"replica_index must be in [0, num_replicas), got {self.replica_index} of {self.num_replicas}"
            )
        if self.num_replicas != 1:
            raise ValueError(
                f"num_replicas={self.num_replicas}: serving a part of each epoch per replica is not "
                "supported by this version; run one server per dataset"
            )

    @property
    def num_slots(self) -> int:
        return self.slots or max(8, 4 * self.num_workers + 4)


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
                built, registry, self._pool, self._ring, self.config.chunk_bytes, self.jobs
            )
            self._grpc = grpc.server(
                ThreadPoolExecutor(self.config.max_streams + 4, thread_name_prefix="batchferry-rpc"),
                handlers=[self.service.handlers()],
                options=wire.CHANNEL_OPTIONS,
                maximum_concurrent_rpcs=self.config.max_streams,
            )
            self.port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.port}")
            if self.port == 0:
                raise OSError(f"could not bind {self.config.host}:{self.config.port}")
            self._grpc.start()
        except BaseException:
            self.close()
            raise
        log.info(
            "serving %s on %s with %d worker(s)",
            ", ".join(built),
            self.address,
            self.config.num_workers,
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
