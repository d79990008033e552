"""``batchferry.client.DataLoader``: torch's DataLoader loop, batches built by a server.

>>> from batchferry.client import DataLoader
>>> loader = DataLoader("127.0.0.1:50051", "train", batch_size=256, shuffle=True, seed=42)  # doctest: +SKIP
>>> for x, y in loader:  # doctest: +SKIP
...     ...

Order parity: with ``shuffle=True`` and ``generator=g`` (or ``seed=S``), the k-th
iteration yields exactly the batches torch's DataLoader yields on its k-th
iteration with the same generator (see :mod:`batchferry.sampling`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from batchferry import cleanup, codec, sampling, wire
from batchferry.errors import (
    BatchTimeout,
    InvalidArgument,
    ProtocolError,
    ServerSideWarning,
    ServerUnavailable,
)
from batchferry.security import ClientSecurity
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool
from .device import CudaCopier
from .receivers import Receiver, Receivers
from .replicas import Replica, ReplicaSet
from .sampler import ClientSampling, EpochIndices
from .segments import SegmentCache, probe
from .stats import LoaderStats, Recorder, log_interval
from .stream import CLOSE_GRACE, PENDING, Batch, EpochStream

__all__ = ["DataLoader", "LoaderConfig"]

log = logging.getLogger("batchferry.client")

_STATE_VERSION = 1
_SEGMENTS = 256  # mapped segments besides receivers' slots (a server's ring, with room)
_RECEIVER_TRIES = 3  # opens of one stream at iter() while receiver processes keep dying
TRANSPORTS = ("auto", "grpc", "shm")
COMPRESSIONS = ("none", "lz4", "zstd", "auto")
MODES = ("independent", "sharded", "shared", "dynamic")
_MODES = {
    "independent": _pb2.MODE_INDEPENDENT,
    "sharded": _pb2.MODE_SHARDED,
    "shared": _pb2.MODE_SHARED,
    "dynamic": _pb2.MODE_DYNAMIC,
}
# Dynamic mode over several replicas: how long to wait on one before looking at the next.
_DYNAMIC_SLICE = 0.005
_ALIVE_CHECK = 2.0  # seconds a server gets to answer after no batch came within timeout
_NO_LIMIT = 365 * 24 * 3600.0  # timeout=0, as in torch: wait as long as it takes
# Byte-stream connections per server by default: one stream moves one message at a time.
_BYTE_STREAMS = 2
# The caller's sampler runs this far ahead (batches per replica, and samples in all) when
# its batches are small, so that the server can build them several at a time.
_LISTS_AHEAD = 64
_LISTS_AHEAD_SAMPLES = 1 << 17


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """A loader's settings, validated once and passed down as one object."""

    # The server(s), as given: "host:port", "a:1, b:2" (replicas), or "dns:///NAME:PORT".
    address: str
    dataset: str
    batch_size: int = 1
    shuffle: bool = False
    drop_last: bool = False
    collate_fn: str = "default"
    pin_memory: bool = False
    device: torch.device | None = None
    prefetch_factor: int = 4
    timeout: float = 60.0
    log_stats_every: float = 0.0  # seconds between stats log lines (0: off)
    transport: str = "auto"
    chunk_bytes: int = 0
    mode: str = "independent"
    job: str = ""
    rank: int = 0
    world_size: int = 1
    in_order: bool = True
    streams: int | None = None  # byte-stream connections per server (None: automatic)
    compression: str = "none"  # byte-stream payload codec (COMPRESSIONS)
    receive_processes: bool = False  # each byte stream received by a process of its own

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, why: str) -> InvalidArgument:
            return InvalidArgument(f"{field} {why}, got {value!r}")

        if not isinstance(self.address, str) or not self.address:
            raise bad("address", self.address, "must be 'host:port'")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise bad("dataset", self.dataset, "must be a non-empty name")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "must be a positive integer")
        if not isinstance(self.collate_fn, str) or not self.collate_fn:
            raise bad(
                "collate_fn",
                self.collate_fn,
                "must be the name of a collate registered on the server",
            )
        if not isinstance(self.prefetch_factor, int) or not 1 <= self.prefetch_factor <= 64:
            raise bad("prefetch_factor", self.prefetch_factor, "must be an integer in [1, 64]")
        if not isinstance(self.timeout, (int, float)) or not self.timeout > 0 or math.isnan(self.timeout):
            raise bad("timeout", self.timeout, "must be a positive number of seconds (0: no limit)")
        every = self.log_stats_every
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 <= every < math.inf:
            raise bad("log_stats_every", every, "must be a number of seconds >= 0 (0: off)")
        if self.transport not in TRANSPORTS:
            raise bad("transport", self.transport, f"must be one of {TRANSPORTS}")
        if self.mode not in MODES:
            raise bad("mode", self.mode, f"must be one of {MODES}")
        if self.compression not in COMPRESSIONS:
            raise bad("compression", self.compression, f"must be None or one of {COMPRESSIONS}")
        if self.compression != "none":
            codec.load()  # ImportError naming the extra to install, now rather than mid-epoch
        if self.mode != "independent" and (not isinstance(self.job, str) or not self.job):
            raise bad(
                "job", self.job, f"must name the job in {self.mode} mode (any string its consumers share)"
            )
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, value, "must be an integer")
        if self.world_size < 1:
            raise bad("world_size", self.world_size, "must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise bad("rank", self.rank, f"must be in [0, world_size={self.world_size})")
        if self.streams is not None and (
            isinstance(self.streams, bool) or not isinstance(self.streams, int) or not 1 <= self.streams <= 16
        ):
            raise bad("streams", self.streams, "must be an integer in [1, 16]")
        if self.streams not in (None, 1) and self.mode not in ("independent", "sharded"):
            raise bad(
                "streams",
                self.streams,
                f"must be 1 in {self.mode} mode (the job's consumers share one order)",
            )
        if not isinstance(self.receive_processes, bool):
            raise bad("receive_processes", self.receive_processes, "must be a bool")
        if self.chunk_bytes and not wire.MIN_CHUNK_BYTES <= self.chunk_bytes <= wire.MAX_CHUNK_BYTES:
            raise bad(
                "chunk_bytes",
                self.chunk_bytes,
                f"must be 0 or in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}]",
            )


@dataclass(frozen=True)
class _Resume:
    """Where the next iter() starts: a loaded state_dict's epoch and batch."""

    epoch: int
    batch: int
    sampler_state: bytes
    done: bytes = b""
    epoch_start: dict[str, Any] | None = None


def _torch_batching(
    batch_size: int | None,
    shuffle: bool | None,
    sampler: Any,
    batch_sampler: Any,
    drop_last: bool,
    mode: str,
) -> tuple[int, bool]:
    """batch_size and shuffle after torch's own checks of how they combine with samplers."""
    if batch_sampler is not None:
        if batch_size != 1 or shuffle or sampler is not None or drop_last:
            raise InvalidArgument(
                "batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, and drop_last"
            )
        batch_size = 1
    if sampler is not None and shuffle:
        raise InvalidArgument("sampler option is mutually exclusive with shuffle")
    if batch_size is None:
        raise InvalidArgument(
            "batch_size=None (samples one by one, no batch dimension) is not supported: the server "
            "builds batches; use batch_size=1 and take batch[0]"
        )
    if (sampler is not None or batch_sampler is not None) and mode != "independent":
        raise InvalidArgument(
            f"sampler and batch_sampler choose one loader's batches: not in {mode} mode, where the "
            "job's consumers share one order (use mode='independent', or DistributedSampler as sampler=)"
        )
    return batch_size, bool(shuffle)


def _device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device {device!r} is not a torch device") from exc
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise InvalidArgument(f"device must be None, 'cpu' or a CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device={device!r} but CUDA is not available on this machine")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


class DataLoader:
    """Iterate batches of a server-side dataset; mirrors ``torch.utils.data.DataLoader``.

    Args:
        address: ``"host:port"`` of a batchferry server; with replicas, a list of every
            replica's ``"host:port"`` or a ``"dns:///NAME:PORT"`` that resolves to all of
            them (a Kubernetes headless Service). The batches are the same as from one
            server: replica i of R builds the batches b with b % R == i.
        dataset: name of a dataset on that server (``batchferry datasets ADDRESS``).
        batch_size, shuffle, drop_last: as in torch.
        generator: a CPU ``torch.Generator`` driving the shuffle, advanced exactly as
            torch's DataLoader would advance it.
        seed: shorthand for ``generator=torch.Generator().manual_seed(seed)``.
        collate_fn: the *name* of a collate in the server's registry
            (``"default"``, ``"pad"`` or one the server registered).
        pin_memory: land batches in page-locked host buffers (ignored without CUDA).
        device: ``"cuda"`` (or ``"cuda:N"``) to receive batches on that GPU, copied on a
            side stream; ``None`` keeps them on the CPU.
        prefetch_factor: batch frames in flight between server and client (a frame is one
            batch, or several small ones the server groups).
        timeout: seconds to wait for the server and for each batch.
        transport: ``"shm"`` maps the server's shared memory (same host, or containers
            sharing IPC and /dev/shm); ``"grpc"`` streams the bytes; ``"auto"`` uses shm
            when the server's memory is visible from here, else the byte stream.
        compression: the byte stream's payload codec: ``None`` or ``"none"`` (default: off),
            ``"lz4"`` or ``"zstd"`` (blosc2 with a byte shuffle; lz4 is fast, zstd denser), or
            ``"auto"``: lz4 to servers on another host, off on this one. The server still
            sends a batch raw when its first chunk does not shrink by 10%. Batches sent by
            shared memory are never compressed. Needs ``pip install 'batchferry[compression]'``.
        receive_processes: receive each byte stream in a process of its own, which writes
            the payloads into shared memory that this process maps (as from a server on this
            host): the bytes never pass through this interpreter, so the training loop's
            thread does not compete with receiving for it. For fast links to servers on
            other hosts; no effect on the same host.
        mode: ``"independent"``: this loader gets its own full epochs.
        tls, root_certificates, client_cert, client_key: TLS to the server (on when any
            certificate is given); PEM bytes or file paths. ``root_certificates`` is the CA
            that signed the server's certificate (default: the system's); ``client_cert``
            and ``client_key`` prove this client to a server that requires mutual TLS.
        token: a bearer token the server accepts (default: ``BATCHFERRY_TOKEN``).
        credentials: ready-made ``grpc.ChannelCredentials`` instead of the certificates.
        log_stats_every: log :meth:`stats` every that many seconds (at INFO, logger
            ``batchferry.client.stats``, from the loop's thread at the next batch);
            default: ``BATCHFERRY_LOG_STATS_EVERY``, else 0 (off).

    Batches have the structure the collate returns (tuples of samples collate to
    lists, as in torch). Errors are raised from :mod:`batchferry.errors`.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        dataset: str,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: Iterable[int] | None = None,
        batch_sampler: Iterable[list[int]] | None = None,
        num_workers: int | None = None,
        collate_fn: str | None = "default",
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 60.0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        seed: int | None = None,
        device: str | torch.device | None = None,
        batch_transform: Callable[[Any], Any] | None = None,
        transport: str = "auto",
        streams: int | None = None,
        compression: str | None = None,
        receive_processes: bool = False,
        mode: str = "independent",
        job: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        chunk_bytes: int = 0,
        tls: bool | None = None,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        client_cert: bytes | str | os.PathLike[str] | None = None,
        client_key: bytes | str | os.PathLike[str] | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        log_stats_every: float | None = None,
    ) -> None:
        if generator is not None and seed is not None:
            raise InvalidArgument("give generator or seed, not both")
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise InvalidArgument(f"generator must be a CPU torch.Generator, got {generator!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidArgument(f"seed must be an integer, got {seed!r}")
        if mode != "independent" and generator is not None:
            raise InvalidArgument(
                f"{mode} mode orders epoch e by seed + e, as DistributedSampler does: "
                "pass seed=, not generator="
            )
        batch_size, shuffle = _torch_batching(batch_size, shuffle, sampler, batch_sampler, drop_last, mode)
        if callable(collate_fn):
            raise InvalidArgument(
                "collate_fn: a function cannot be sent to the server (nothing on the wire is code); "
                "register it in the server (register_collate, batchferry serve --import) and pass its "
                "name, or pass batch_transform= for code that must run here in the trainer"
            )
        if batch_transform is not None and not callable(batch_transform):
            raise InvalidArgument(f"batch_transform must be callable, got {type(batch_transform).__name__}")
        if not isinstance(in_order, bool):
            raise InvalidArgument(f"in_order must be a bool, got {in_order!r}")
        if prefetch_factor is None:
            prefetch_factor = 4
        if pin_memory_device and not device and torch.cuda.is_available():
            _device(pin_memory_device)  # checked; pinned host memory serves every GPU
        # Job modes: every consumer derives the order from (seed, epoch), like DistributedSampler.
        self.seed = seed if seed is not None else 0
        if seed is not None and mode == "independent":
            generator = torch.Generator().manual_seed(seed)
        dev = _device(device)
        security = ClientSecurity.create(
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            token=token,
            credentials=credentials,
        )
        replicas = ReplicaSet(address, security)  # checks the address's form; connects lazily
        self.config = LoaderConfig(
            address=replicas.description,
            dataset=dataset,
            batch_size=batch_size,
            shuffle=bool(shuffle),
            drop_last=bool(drop_last),
            collate_fn=collate_fn if collate_fn is not None else "default",
            pin_memory=bool(pin_memory),
            device=dev,
            prefetch_factor=prefetch_factor,
            timeout=_NO_LIMIT if timeout == 0 else float(timeout),
            log_stats_every=log_interval(log_stats_every),
            transport=transport,
            chunk_bytes=chunk_bytes,
            mode=mode,
            job=job or "",
            rank=rank,
            world_size=world_size,
            in_order=in_order,
            streams=streams,
            compression="none" if compression is None else compression,
            receive_processes=receive_processes,
        )
        self._sampling = (
            ClientSampling(sampler, batch_sampler, batch_size, bool(drop_last))
            if sampler is not None or batch_sampler is not None
            else None
        )
        self._batch_transform = batch_transform
        # torch draws the base seed only once with persistent workers (later epochs
        # reuse the iterator): match it, so the order stays torch's.
        self._seed_once = bool(persistent_workers) and bool(num_workers)
        self._server_side = {
            "num_workers": num_workers,
            "worker_init_fn": worker_init_fn,
            "multiprocessing_context": multiprocessing_context,
        }
        self._warned = False
        self._iterated = False
        self.generator = generator
        self._initial_state = generator.get_state() if generator is not None else None
        self._epoch = 0
        self._resume: _Resume | None = None
        self._active: _Iterator | None = None
        self._length: int | None = None
        self._use_shm: list[bool] | None = None  # per replica
        self._replicas = replicas
        pin = (self.config.pin_memory or dev is not None) and torch.cuda.is_available()
        # Grown to cover every replica's stream once the replicas are known.
        self._pool = BufferPool(prefetch_factor + 2, pin=pin)
        self._copier = CudaCopier(dev) if dev is not None else None
        self._segments = SegmentCache(register_with_cuda=dev is not None)
        # The replicas' settings: with a dns:/// name they check certificates against it.
        self._receivers = Receivers(replicas.security) if receive_processes else None
        self._stats = Recorder(self.config.log_stats_every)
        self._closed = False
        cleanup.start()
        cleanup.close_at_exit(self)

    # -- dataset facts ----------------------------------------------------------------
    def _dataset_length(self) -> int:
        if self._length is None:
            replicas = self._replicas.discover(self.config.dataset, self.config.timeout)
            info = {d.name: d for d in replicas[0].info.datasets}[self.config.dataset]
            self._length = int(info.length)
            parts = len(replicas) * (self.config.streams or _BYTE_STREAMS)
            per_stream = max(2, -(-self.config.prefetch_factor // parts))
            self._pool.max_buffers = max(self._pool.max_buffers, parts * per_stream + 2)
            self._warn_server_side(int(replicas[0].info.num_workers))
        return self._length

    def _warn_server_side(self, server_workers: int) -> None:
        """One warning per loader for torch arguments the server decides."""
        if self._warned:
            return
        self._warned = True
        given = self._server_side
        notes = []
        if given["num_workers"] is not None and given["num_workers"] != server_workers:
            notes.append(
                f"num_workers={given['num_workers']}: the server builds batches with its own "
                f"{server_workers} worker process(es) (batchferry serve --num-workers)"
            )
        if given["worker_init_fn"] is not None:
            notes.append(
                "worker_init_fn does not run: the server's workers set themselves up (the dataset's "
                "constructor, or a module given to batchferry serve --import)"
            )
        if given["multiprocessing_context"] is not None:
            notes.append("multiprocessing_context: the server's workers are always spawned processes")
        if notes:
            warnings.warn("; ".join(notes), ServerSideWarning, stacklevel=4)

    @property
    def stripes(self) -> int:
        """Streams (each on its own connection) per server: more than one only on the byte
        stream, where one stream waits on each message in turn."""
        if self.config.streams is not None:
            return self.config.streams
        if self.config.mode not in ("independent", "sharded") or self.transport == "shm":
            return 1
        return _BYTE_STREAMS

    def _parts(self) -> int:
        return self._replicas.size * self.stripes

    def _credits_per_stream(self) -> int:
        """Batches in flight per stream: prefetch_factor in all, at least 2 per stream."""
        parts = self._parts()
        if parts <= 1:
            return self.config.prefetch_factor
        return max(2, -(-self.config.prefetch_factor // parts))

    def _shm_visible(self, replica: Replica) -> bool:
        visible = probe(replica.info.shm_probe, replica.info.shm_token)
        if self.config.transport == "shm" and not visible:
            raise InvalidArgument(
                f"transport='shm' needs the server's shared memory, but the segment "
                f"{replica.info.shm_probe or '(none)'} of {replica.address} is not visible here (another "
                "host, or a container without the server's IPC namespace and /dev/shm); use 'auto' or 'grpc'"
            )
        return visible and self.config.transport != "grpc"

    @property
    def transport(self) -> str:
        """The transport in use: ``"shm"`` (same host), ``"grpc"`` (byte stream), or with
        replicas on several hosts ``"shm+grpc"`` (each replica uses what it can)."""
        if self._use_shm is None:
            self._dataset_length()
            self._use_shm = [self._shm_visible(r) for r in self._replicas.replicas]
        if all(self._use_shm):
            return "shm"
        return "shm+grpc" if any(self._use_shm) else "grpc"

    @property
    def num_replicas(self) -> int:
        """Servers sharing each epoch (1 for a single server)."""
        self._dataset_length()
        return self._replicas.size

    def __len__(self) -> int:
        """Batches per epoch (dynamic mode: of the whole job, an upper bound for one consumer)."""
        if self._sampling is not None:
            return len(self._sampling)
        length = self._dataset_length()
        if self.config.mode == "sharded":
            length = sampling.shard_length(length, self.config.world_size, self.config.drop_last)
        return sampling.num_batches(length, self.config.batch_size, self.config.drop_last)

    # -- statistics -------------------------------------------------------------------
    def stats(self, *, reset: bool = False) -> LoaderStats:
        """Batches and bytes received and the loop's wait for them (:class:`LoaderStats`),
        over every epoch since the first ``iter()``. ``reset=True`` returns them and begins
        a new window (per-epoch figures: call it at each epoch's end). Asks the server
        nothing; cheap enough for every step."""
        return self._stats.snapshot(time.perf_counter(), *self._links(), reset=reset)

    def _links(self) -> tuple[tuple[str, ...], int]:
        """Each replica's transport and the streams per replica, once decided (at ``iter()``)."""
        if self._use_shm is None:
            return (), 0
        return tuple("shm" if shm else "grpc" for shm in self._use_shm), self.stripes

    def _log_stats(self, now: float) -> None:
        name = f"loader {self.config.dataset!r} from {self.config.address}"
        self._stats.log_line(now, *self._links(), name=name)

    # -- epochs and state -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` starts (or resumes)."""
        return self._resume.epoch if self._resume is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` (0-based) of this loader's sequence.

        With a generator or seed, the generator is put where ``epoch`` fully consumed
        torch iterations from its initial state would have left it.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidArgument(f"epoch must be a non-negative integer, got {epoch!r}")
        self._resume = None
        if self.generator is not None and self._initial_state is not None and epoch != self._epoch:
            self.generator.set_state(self._initial_state)
            for _ in range(epoch):
                sampling.replay_epoch(self.generator, self._dataset_length(), self.config.shuffle)
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: plain ints and bytes, a few KiB at most."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "dataset": self.config.dataset,
            "batch_size": self.config.batch_size,
            "shuffle": self.config.shuffle,
            "drop_last": self.config.drop_last,
            "epoch": self._epoch,
            # True while an epoch has begun (its draws made) and not ended.
            "in_epoch": False,
            "batch": 0,
            "sampler_state": b"",
            "generator_state": (
                bytes(self.generator.get_state().numpy().tobytes()) if self.generator is not None else b""
            ),
        }
        it = self._active
        resume = self._resume
        if resume is None and it is not None and not it.finished:
            start = it.indices.start.as_dict() if it.indices is not None else None
            resume = _Resume(it.epoch, it.yielded, it.sampler_state, bytes(it.done), start)
        if resume is not None:
            state["epoch"], state["batch"], state["sampler_state"] = (
                resume.epoch,
                resume.batch,
                resume.sampler_state,
            )
            # Out of order (in_order=False, dynamic mode): which batches were taken.
            state["done"] = resume.done
            if resume.epoch_start is not None:
                # The caller's sampler: the RNG states the epoch began from, to replay it.
                state["epoch_start"] = resume.epoch_start
            state["in_epoch"] = True
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` yields the batch after the saved one."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise InvalidArgument(
                f"state_dict version must be {_STATE_VERSION}, got {state.get('version')!r}"
            )
        for key in ("dataset", "batch_size", "shuffle", "drop_last"):
            if state.get(key) != getattr(self.config, key):
                raise InvalidArgument(
                    f"state_dict {key} is {state.get(key)!r} "
                    f"but this loader has {getattr(self.config, key)!r}"
                )
        epoch, batch = state.get("epoch"), state.get("batch")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(batch, int) or batch < 0:
            raise InvalidArgument(
                f"state_dict epoch and batch must be non-negative ints, got {epoch!r}, {batch!r}"
            )
        gen_state, sampler_state = (
            state.get("generator_state", b""),
            state.get("sampler_state", b""),
        )
        if not isinstance(gen_state, bytes):
            raise InvalidArgument(f"state_dict generator_state must be bytes, got {type(gen_state).__name__}")
        if not isinstance(sampler_state, bytes):
            raise InvalidArgument(
                f"state_dict sampler_state must be bytes, got {type(sampler_state).__name__}"
            )
        in_epoch = state.get("in_epoch", False)
        if not isinstance(in_epoch, bool):
            raise InvalidArgument(f"state_dict in_epoch must be a bool, got {in_epoch!r}")
        if gen_state:
            if self.generator is None:
                self.generator = torch.Generator()
            try:
                self.generator.set_state(sampling.generator_from_state(gen_state).get_state())
            except ValueError as exc:
                raise InvalidArgument(f"state_dict generator_state: {exc}") from exc
        done, epoch_start = state.get("done", b""), state.get("epoch_start")
        if not isinstance(done, bytes):
            raise InvalidArgument(f"state_dict done must be bytes, got {type(done).__name__}")
        if epoch_start is not None and (not isinstance(epoch_start, dict) or self._sampling is None):
            raise InvalidArgument(
                "state_dict epoch_start belongs to a loader with a sampler or batch_sampler"
            )
        if in_epoch and self._sampling is not None and epoch_start is None:
            raise InvalidArgument(
                "state_dict has no epoch_start: it was not saved by a loader with a sampler"
            )
        if in_epoch:
            any_order = self.config.mode == "dynamic" or not self.config.in_order
            batch, done = _resume_in_order(batch, done, any_order)
        self._epoch = epoch
        self._resume = _Resume(epoch, batch, sampler_state, done, epoch_start) if in_epoch else None

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        began = time.perf_counter()
        self._stats.begin(began)
        try:
            it = self._begin(began)
        finally:
            self._stats.wait_s += time.perf_counter() - began  # opening the streams is waiting too
        self._stats.epochs += 1
        return it

    def _begin(self, began: float) -> _Iterator:
        if self._active is not None:
            self._active.close()
            self._active = None
        # Nothing moves until the streams are open: an iter() that fails (server away,
        # bad argument) leaves the epoch, the resume point and the generator as they
        # were, so a retry yields the same epoch torch would.
        before = (
            self._epoch,
            self._resume,
            self.generator.get_state() if self.generator is not None else None,
        )
        try:
            global_rng = torch.get_rng_state()  # the caller's sampler may draw from it
            indices: EpochIndices | None = None
            resume = self._resume
            if resume is not None:
                epoch, start, sampler_state, done = (
                    resume.epoch,
                    resume.batch,
                    resume.sampler_state,
                    resume.done,
                )
                if self._sampling is not None:
                    assert resume.epoch_start is not None
                    skip = 0 if done else start  # out of order: replay it all, skip what was done
                    indices = self._sampling.resume(self.generator, resume.epoch_start, skip)
            else:
                epoch, start, done = self._epoch, 0, b""
                sampler_state = b""
                draw = not (self._seed_once and self._iterated)
                if self._sampling is not None:
                    indices = self._sampling.begin(self.generator, draw_base_seed=draw)
                elif self.config.mode == "independent":
                    sampler_state = sampling.begin_iteration(self.generator, self.config.shuffle, draw)
            self.transport  # noqa: B018 - fails fast (NotFound, ServerUnavailable) before a stream opens
            it = _Iterator(self, epoch, start, sampler_state, indices=indices, done=done, began=began)
        except BaseException:
            self._epoch, self._resume, gen_state = before
            if self.generator is not None and gen_state is not None:
                self.generator.set_state(gen_state)
            torch.set_rng_state(global_rng)
            raise
        self._resume = None
        self._epoch = epoch + 1
        self._iterated = True
        self._active = it
        return it

    def close(self) -> None:
        """End any iteration and release the connection and buffers. Idempotent; it
        waits a few seconds at most (the server gets the slots back first)."""
        self._closed = True
        cleanup.forget_at_exit(self)
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._receivers is not None:
            self._receivers.close()
        self._replicas.close()
        self._segments.close()
        self._pool.close()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped without close(): a finalizer must not wait, so hand the clean-up over.
        # (At interpreter exit the atexit hook has closed it already.)
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # module globals may be gone at shutdown
                cleanup.later(self.close)


class _Iterator:
    """One epoch of a DataLoader, merged from one stream per replica.

    In order, batch b comes from replica b % R, so the merged epoch is what one
    server sends; dynamic mode (and ``in_order=False``) takes whichever replica has a
    batch ready. With the caller's own sampler, the index lists go to the replica
    that builds each batch, ahead of need (two credit windows, or up to 64 batches when
    they are small, so the server can build them in groups). A stream whose server goes away
    is reopened at the next batch not yet yielded (told which it already has).
    """

    def __init__(
        self,
        loader: DataLoader,
        epoch: int,
        start: int,
        sampler_state: bytes,
        *,
        indices: EpochIndices | None = None,
        done: bytes = b"",
        began: float | None = None,
    ) -> None:
        self._loader = loader
        self._stats = loader._stats
        self._began: float | None = began  # the iter() call, until the first batch is handed out
        self.epoch = epoch
        self.sampler_state = sampler_state
        self.finished = False
        self.indices = indices
        self._copier = loader._copier
        self._transform = loader._batch_transform
        # Batches may arrive in any order: dynamic mode, or in_order=False.
        self._any_order = loader.config.mode == "dynamic" or not loader.config.in_order
        # In order: the epoch index of the next batch to yield (also how many came
        # before). In any order: how many were yielded; ``done`` says which.
        self.yielded = start
        self.done = bytearray(done)
        self._replicas = loader._replicas.size
        self._stripes = loader.stripes
        count = self._replicas * self._stripes  # stream j: replica j % R, stripe j // R
        self._streams: list[EpochStream] = []
        self._first: list[int] = []  # per replica: the first batch its stream sends
        self._ended = [False] * count
        self._turn = 0
        # The caller's sampler: index lists sent to the servers but not yet yielded.
        self._lists: dict[int, np.ndarray] = {}
        self._ahead_samples = 0  # samples in ``_lists``
        self._next_list = start if not self._any_order else 0
        try:
            for r in range(count):
                self._streams.append(self._open(r, self._resume_point(), loader.config.timeout))
                self._first.append(int(self._streams[r].start.first_batch))
            self._feed()
        except BaseException:
            self.close()
            raise
        start_frame = self._streams[0].start
        self._num_batches = int(start_frame.num_batches)
        # torch's RandomSampler draws the permutation from the generator on the
        # first batch; leave the generator where that draw would.
        if loader.generator is not None and start_frame.state_after_order:
            loader.generator.set_state(_state(start_frame.state_after_order))

    # -- streams --------------------------------------------------------------------
    def _resume_point(self) -> int:
        return 0 if self._any_order else self.yielded

    def _local_done(self, j: int) -> bytes:
        """The batches of stream ``j`` already yielded, as a bitmap over its positions."""
        if not self._any_order or not self.done:
            return b""
        bits = np.unpackbits(np.frombuffer(bytes(self.done), dtype=np.uint8), bitorder="little")
        parts = self._replicas * self._stripes
        return np.packbits(bits[j::parts], bitorder="little").tobytes()

    def _open(self, j: int, start: int, timeout: float) -> EpochStream:
        """Stream ``j`` from batch ``start``; a receiver process that dies meanwhile is
        replaced (a few times), as it is mid-epoch."""
        receivers = self._loader._receivers
        for _ in range(_RECEIVER_TRIES - 1):
            try:
                return self._open_once(j, start, timeout)
            except (ServerUnavailable, BatchTimeout) as exc:
                receiver = receivers.current(j) if receivers is not None else None
                if receiver is None:
                    raise
                if receiver.alive() and (
                    isinstance(exc, ServerUnavailable) or receiver.responsive(_ALIVE_CHECK)
                ):
                    raise  # the server's doing, not a receiver's
                receiver.kill()  # dead, or stuck (stopped between epochs): a fresh one next
        return self._open_once(j, start, timeout)

    def _open_once(self, j: int, start: int, timeout: float) -> EpochStream:
        cfg, loader = self._loader.config, self._loader
        r, k = j % self._replicas, j // self._replicas
        shm = loader._use_shm is not None and loader._use_shm[r]
        credits = loader._credits_per_stream()
        relay = not shm and loader._receivers is not None
        stream = EpochStream(
            self._receiver(j, credits) if relay else loader._replicas.stripe_channel(r, k),
            _pb2.OpenStream(
                dataset=cfg.dataset,
                batch_size=cfg.batch_size,
                shuffle=cfg.shuffle,
                sampler_state=self.sampler_state,
                drop_last=cfg.drop_last,
                collate=cfg.collate_fn,
                epoch=self.epoch,
                start_batch=start,
                credits=credits,
                chunk_bytes=cfg.chunk_bytes,
                transport=_pb2.TRANSPORT_SHM if shm else _pb2.TRANSPORT_BYTES,
                compression=self._compression(r, shm),
                groups=True,
                mode=_MODES[cfg.mode],
                job=cfg.job,
                rank=cfg.rank,
                world_size=cfg.world_size,
                seed=loader.seed,
                replica_index=r,
                num_replicas=self._replicas,
                stripe=k,
                stripes=self._stripes,
                taken=self._local_done(j),
                any_order=not cfg.in_order and cfg.mode != "dynamic",
                client_batches=self.indices is not None,
            ),
            pool=loader._pool,
            copier=self._copier,
            segments=loader._segments if shm or relay else None,
            timeout=timeout,
            metadata=loader._replicas.security.metadata,
            server=loader._replicas.replicas[r].address,
        )
        if relay:
            stream.on_starved = self._copy_out_kept
        if self.indices is not None:  # a reopened stream needs the lists it had not built yet
            parts = self._replicas * self._stripes
            resend = {b: samples for b, samples in self._lists.items() if b % parts == j}
            self._send_lists(stream, resend, self.indices.total)
        return stream

    def _receiver(self, j: int, credits: int) -> Receiver:
        """Stream ``j``'s receiver process. Its slots: a frame per credit in flight, those
        the loop still views (two steps) and those queued here, with room to spare."""
        assert self._loader._receivers is not None
        address = self._loader._replicas.replicas[j % self._replicas].address
        max_slots = 2 * credits + 8
        self._loader._segments.reserve(_SEGMENTS + self._replicas * self._stripes * max_slots)
        return self._loader._receivers.get(j, address, max_slots=max_slots)

    def _copy_out_kept(self) -> None:
        """A receiver waits for room in /dev/shm that kept batches of any stream may hold."""
        for stream in self._streams:
            stream.copy_out_kept()

    def _compression(self, r: int, shm: bool) -> _pb2.Codec:
        """The codec replica ``r``'s stream asks for: none over shared memory; with "auto",
        lz4 only to a server on another host (its shared memory is not visible here)."""
        wanted = self._loader.config.compression
        if shm or wanted == "none":
            return _pb2.CODEC_NONE
        if wanted == "auto":
            info = self._loader._replicas.replicas[r].info
            return _pb2.CODEC_NONE if probe(info.shm_probe, info.shm_token) else _pb2.CODEC_LZ4
        return codec.CODECS[wanted]

    @staticmethod
    def _send_lists(stream: EpochStream, lists: dict[int, np.ndarray], total: int | None) -> None:
        if not lists and total is None:
            return
        order = sorted(lists)
        stream.send_batches(
            _pb2.BatchIndices(
                index=order,
                lengths=[len(lists[b]) for b in order],
                samples=np.concatenate([lists[b] for b in order]).tolist() if order else [],
                end=total is not None,
                total=total or 0,
            )
        )

    def _feed(self) -> None:
        """Send the index lists of the next batches (a window ahead) to their replicas."""
        if self.indices is None or self.indices.total is not None:
            return
        replicas = len(self._streams)
        # Always two credit windows ahead; small batches up to _LISTS_AHEAD batches (and
        # _LISTS_AHEAD_SAMPLES samples) ahead, so the server can build them in groups, topped
        # up once half of that is used (one message per many batches, not one per batch).
        low = self._loader._credits_per_stream() * replicas * 2
        high = max(low, _LISTS_AHEAD * replicas)
        done = self.yielded_count()
        if self._next_list >= done + max(low, high // 2):
            return
        fresh: dict[int, dict[int, np.ndarray]] = {r: {} for r in range(replicas)}
        while self._next_list < done + low or (
            self._next_list < done + high and self._ahead_samples < _LISTS_AHEAD_SAMPLES
        ):
            samples = self.indices.pull()
            if samples is None:
                break
            index, self._next_list = self._next_list, self._next_list + 1
            if self._is_done(index):
                continue  # yielded before this iterator (resumed out of order)
            self._lists[index] = samples
            self._ahead_samples += len(samples)
            fresh[index % replicas][index] = samples
        for r, lists in fresh.items():
            self._send_lists(self._streams[r], lists, self.indices.total)

    def yielded_count(self) -> int:
        return self.yielded

    def _is_done(self, index: int) -> bool:
        return index // 8 < len(self.done) and bool(self.done[index // 8] >> (index % 8) & 1)

    def _mark_done(self, index: int) -> None:
        if len(self.done) <= index // 8:
            self.done.extend(bytes(index // 8 + 1 - len(self.done)))
        self.done[index // 8] |= 1 << (index % 8)

    def _where(self, j: int) -> str:
        r = j % self._replicas
        address = self._loader._replicas.replicas[r].address
        return f"replica {r} of {self._replicas} ({address})" if self._replicas > 1 else f"server {address}"

    def _reconnect(self, j: int, cause: ServerUnavailable) -> None:
        """Reopen stream ``j`` at the next batch not yet yielded, with backoff within ``timeout``."""
        r = j % self._replicas
        timeout = self._loader.config.timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        self._streams[j].close()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"{self._where(r)} did not come back within timeout={timeout}s "
                    f"(epoch {self.epoch}, after batch {self.yielded})"
                ) from cause
            try:
                found = self._loader._replicas.refresh(r, remaining)
                if found is not None:
                    if self._loader._use_shm is not None:
                        # A restarted server has a new ring, and a rescheduled pod may be on
                        # another host: decide the transport again.
                        self._loader._use_shm[r] = self._loader._shm_visible(found)
                    self._streams[j] = self._open(j, self._resume_point(), remaining)
                    self._first[j] = int(self._streams[j].start.first_batch)
                    self._stats.reconnects += 1
                    log.info("reconnected to %s at batch %d", self._where(j), self.yielded)
                    return
            except (ServerUnavailable, BatchTimeout):
                pass
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 2.0)

    def _replace_stuck_receiver(self, j: int) -> bool:
        """Whether stream ``j`` was silent because its receiver process is stuck (it does
        not answer a ping): it is then killed, and the stream reopened on a fresh one."""
        receivers = self._loader._receivers
        receiver = receivers.current(j) if receivers is not None else None
        if receiver is None or receiver.responsive(_ALIVE_CHECK):
            return False
        receiver.kill()
        log.warning("receiver process %d stopped answering: replacing it", receiver.pid)
        self._reconnect(j, ServerUnavailable(f"receiver process {receiver.pid} stopped answering"))
        return True

    def _next_from(self, j: int, wait: float | None = None) -> Batch | object | None:
        """Stream ``j``'s next batch (None at its end, PENDING after ``wait``), reconnecting."""
        while True:
            try:
                return self._streams[j].next(wait)
            except ServerUnavailable as exc:
                self._reconnect(j, exc)
            except BatchTimeout as exc:
                # Nothing for ``timeout``: a slow server, a stuck receiver process, or a dead
                # link that keepalive has not reported yet. Tell them apart with quick questions.
                if self._replace_stuck_receiver(j):
                    continue
                if self._loader._replicas.refresh(j % self._replicas, _ALIVE_CHECK) is None:
                    timeout = self._loader.config.timeout
                    raise ServerUnavailable(
                        f"{self._where(j)} unreachable: no batch within timeout={timeout}s and no answer "
                        f"since (epoch {self.epoch}, after batch {self.yielded})"
                    ) from exc
                raise

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> Any:
        stats = self._stats
        began = time.perf_counter()
        try:
            data = self._take()
        except BaseException:  # the end of the epoch too: its last frames were waited for
            stats.wait_s += time.perf_counter() - began
            raise
        now = time.perf_counter()
        stats.wait_s += now - began
        if self._began is not None:
            stats.first_batch_s, self._began = now - self._began, None
        if now >= stats.log_at:
            self._loader._log_stats(now)
        return data

    def _take(self) -> Any:
        """The next batch as the loop gets it; StopIteration at the end of the epoch."""
        if self.finished:
            raise StopIteration
        self._feed()
        batch = self._next_any() if self._any_order else self._next_ordered()
        if batch is None:
            self.finished = True
            gen = self._loader.generator
            if gen is not None and self._streams[0].start.state_after_epoch:
                gen.set_state(_state(self._streams[0].start.state_after_epoch))
            raise StopIteration
        self.yielded += 1
        taken = self._lists.pop(batch.index, None)
        if taken is not None:
            self._ahead_samples -= len(taken)
        if batch.error is not None:  # taken (the next batch comes next), as the dataset's error
            raise batch.error
        data = batch.data
        if self._copier is not None and batch.event is not None:
            data = self._copier.hand_over(data, batch.event)
        if self._transform is not None:
            began = time.perf_counter()
            try:
                data = self._transform(data)
            finally:
                self._stats.transform_s += time.perf_counter() - began
        # Counted once the loop has it: a batch_transform that raised handed it nothing.
        self._stats.batches += 1
        self._stats.bytes += batch.nbytes
        return data

    def _epoch_length(self) -> float:
        if self.indices is not None:
            return self.indices.total if self.indices.total is not None else float("inf")
        return self._num_batches

    def _next_ordered(self) -> Batch | None:
        replicas = len(self._streams)
        while self.yielded < self._epoch_length():
            index = self.yielded
            r = index % replicas
            if index < self._first[r]:
                self.yielded += 1  # shared mode, joined late: that replica's job is past it
                continue
            batch = self._next_from(r)
            if batch is None and self.indices is not None and self.indices.total == index:
                break  # the sampler ended exactly here
            if not isinstance(batch, Batch) or batch.index != index:
                got = f"batch {batch.index}" if isinstance(batch, Batch) else "the end of its stream"
                raise ProtocolError(f"{self._where(r)} sent {got} where batch {index} was due")
            return batch
        for r in range(replicas):  # every stream's end frame: each flushes its releases
            if not self._ended[r]:
                if self._next_from(r) is not None:
                    raise ProtocolError(f"{self._where(r)} sent more batches than its part of the epoch")
                self._ended[r] = True
        return None

    def _next_any(self) -> Batch | None:
        """Whichever replica has a batch first; the epoch ends when every stream has ended."""
        deadline = time.monotonic() + self._loader.config.timeout
        while True:
            live = [r for r in range(len(self._streams)) if not self._ended[r]]
            if not live:
                return None
            wait = None if len(live) == 1 else _DYNAMIC_SLICE
            for k in range(len(live)):
                r = live[(self._turn + k) % len(live)]
                item = self._next_from(r, wait)
                if item is PENDING:
                    continue
                self._turn += 1
                if item is None:
                    self._ended[r] = True
                    break
                assert isinstance(item, Batch)
                if self._is_done(item.index):
                    raise ProtocolError(f"{self._where(r)} sent batch {item.index} a second time")
                self._mark_done(item.index)
                return item
            else:
                if time.monotonic() >= deadline:
                    if any([self._replace_stuck_receiver(r) for r in live]):
                        deadline = time.monotonic() + self._loader.config.timeout
                        continue
                    raise BatchTimeout(
                        f"no batch from any of {len(live)} replicas within "
                        f"timeout={self._loader.config.timeout}s"
                    )

    def __len__(self) -> int:
        return len(self._loader)

    def close(self) -> None:
        # One grace period for all the streams, not one each (stuck ones are cut off at its end).
        deadline = time.monotonic() + CLOSE_GRACE
        for stream in self._streams:
            stream.stop()  # all at once: their ends come back together
        for stream in self._streams:
            stream.close(deadline)

    def __del__(self) -> None:
        # A finalizer must not wait: the streams close on the clean-up thread.
        with contextlib.suppress(Exception):  # module globals may be gone at shutdown
            for stream in getattr(self, "_streams", ()):
                stream.close_soon()


def _resume_in_order(batch: int, done: bytes, any_order: bool) -> tuple[int, bytes]:
    """A saved resume point (``batch`` taken; out of order, ``done`` says which) in the
    terms of a loader that takes batches ``any_order`` or not, whichever saved it."""
    bits = np.unpackbits(np.frombuffer(done, dtype=np.uint8), bitorder="little").astype(bool)
    if any_order:
        if not bits.any() and batch:  # saved in order: the first ``batch`` were taken
            bits = np.ones(batch, dtype=bool)
        return int(bits.sum()), np.packbits(bits, bitorder="little").tobytes()
    prefix = len(bits) if bits.all() else int(np.argmin(bits))
    if bits[prefix:].any():
        raise InvalidArgument(
            f"state_dict was saved mid-epoch by a loader that took batches out of order (in_order=False "
            f"or dynamic mode): {int(bits.sum())} taken, not the first {int(bits.sum())}; resume it with "
            "in_order=False, or at an epoch's end"
        )
    return (prefix if bits.any() else batch), b""


def _state(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
