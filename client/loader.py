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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from batchferry import cleanup, sampling, wire
from batchferry.errors import BatchTimeout, InvalidArgument, ProtocolError, ServerUnavailable
from batchferry.security import ClientSecurity
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool
from .device import CudaCopier
from .replicas import Replica, ReplicaSet
from .segments import SegmentCache, probe
from .stream import PENDING, Batch, EpochStream

__all__ = ["DataLoader", "LoaderConfig"]

log = logging.getLogger("batchferry.client")

_STATE_VERSION = 1
TRANSPORTS = ("auto", "grpc", "shm")
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
    transport: str = "auto"
    chunk_bytes: int = 0
    mode: str = "independent"
    job: str = ""
    rank: int = 0
    world_size: int = 1

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
        if not isinstance(self.timeout, (int, float)) or not self.timeout > 0 or math.isinf(self.timeout):
            raise bad("timeout", self.timeout, "must be a positive, finite number of seconds")
        if self.transport not in TRANSPORTS:
            raise bad("transport", self.transport, f"must be one of {TRANSPORTS}")
        if self.mode not in MODES:
            raise bad("mode", self.mode, f"must be one of {MODES}")
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
        if self.chunk_bytes and not wire.MIN_CHUNK_BYTES <= self.chunk_bytes <= wire.MAX_CHUNK_BYTES:
            raise bad(
                "chunk_bytes",
                self.chunk_bytes,
                f"must be 0 or in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}]",
            )


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
        prefetch_factor: batches in flight between server and client.
        timeout: seconds to wait for the server and for each batch.
        transport: ``"shm"`` maps the server's shared memory (same host, or containers
            sharing IPC and /dev/shm); ``"grpc"`` streams the bytes; ``"auto"`` uses shm
            when the server's memory is visible from here, else the byte stream.
        mode: ``"independent"``: this loader gets its own full epochs.
        tls, root_certificates, client_cert, client_key: TLS to the server (on when any
            certificate is given); PEM bytes or file paths. ``root_certificates`` is the CA
            that signed the server's certificate (default: the system's); ``client_cert``
            and ``client_key`` prove this client to a server that requires mutual TLS.
        token: a bearer token the server accepts (default: ``BATCHFERRY_TOKEN``).
        credentials: ready-made ``grpc.ChannelCredentials`` instead of the certificates.

    Batches have the structure the collate returns (tuples of samples collate to
    lists, as in torch). Errors are raised from :mod:`batchferry.errors`.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        dataset: str,
        batch_size: int = 1,
        shuffle: bool = False,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        drop_last: bool = False,
        collate_fn: str = "default",
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        prefetch_factor: int = 4,
        timeout: float = 60.0,
        transport: str = "auto",
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
            collate_fn=collate_fn,
            pin_memory=bool(pin_memory),
            device=dev,
            prefetch_factor=prefetch_factor,
            timeout=float(timeout),
            transport=transport,
            chunk_bytes=chunk_bytes,
            mode=mode,
            job=job or "",
            rank=rank,
            world_size=world_size,
        )
        self.generator = generator
        self._initial_state = generator.get_state() if generator is not None else None
        self._epoch = 0
        self._resume: tuple[int, int, bytes] | None = None  # (epoch, batch, sampler_state)
        self._active: _Iterator | None = None
        self._length: int | None = None
        self._use_shm: list[bool] | None = None  # per replica
        self._replicas = replicas
        pin = (self.config.pin_memory or dev is not None) and torch.cuda.is_available()
        # Grown to cover every replica's stream once the replicas are known.
        self._pool = BufferPool(prefetch_factor + 2, pin=pin)
        self._copier = CudaCopier(dev) if dev is not None else None
        self._segments = SegmentCache(register_with_cuda=dev is not None)
        self._closed = False
        cleanup.start()
        cleanup.close_at_exit(self)

    # -- dataset facts ----------------------------------------------------------------
    def _dataset_length(self) -> int:
        if self._length is None:
            replicas = self._replicas.discover(self.config.dataset, self.config.timeout)
            info = {d.name: d for d in replicas[0].info.datasets}[self.config.dataset]
            self._length = int(info.length)
            per_stream = self._credits_per_stream()
            self._pool.max_buffers = max(self._pool.max_buffers, len(replicas) * per_stream + 2)
        return self._length

    def _credits_per_stream(self) -> int:
        """Batches in flight per replica: prefetch_factor in all, at least 2 per stream."""
        if self._replicas.size <= 1:
            return self.config.prefetch_factor
        return max(2, -(-self.config.prefetch_factor // self._replicas.size))

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
        length = self._dataset_length()
        if self.config.mode == "sharded":
            length = sampling.shard_length(length, self.config.world_size, self.config.drop_last)
        return sampling.num_batches(length, self.config.batch_size, self.config.drop_last)

    # -- epochs and state -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` starts (or resumes)."""
        return self._resume[0] if self._resume is not None else self._epoch

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
        if self._resume is not None:
            state["epoch"], state["batch"], state["sampler_state"] = self._resume
            state["in_epoch"] = True
        elif it is not None and not it.finished:
            state["epoch"], state["batch"], state["sampler_state"] = (
                it.epoch,
                it.yielded,
                it.sampler_state,
            )
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
        self._epoch = epoch
        self._resume = (epoch, batch, sampler_state) if in_epoch else None

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
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
            if self._resume is not None:
                epoch, start, sampler_state = self._resume
            else:
                epoch, start = self._epoch, 0
                sampler_state = b""
                if self.config.mode == "independent":
                    sampler_state = sampling.begin_iteration(self.generator, self.config.shuffle)
            self.transport  # noqa: B018 - fails fast (NotFound, ServerUnavailable) before a stream opens
            it = _Iterator(self, epoch, start, sampler_state)
        except BaseException:
            self._epoch, self._resume, gen_state = before
            if self.generator is not None and gen_state is not None:
                self.generator.set_state(gen_state)
            raise
        self._resume = None
        self._epoch = epoch + 1
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

    Ordered modes take batch b from replica b % R, so the merged epoch is what one
    server sends; dynamic mode takes whichever replica has a batch ready. A stream
    whose server goes away is reopened at the next batch not yet yielded.
    """

    def __init__(self, loader: DataLoader, epoch: int, start: int, sampler_state: bytes) -> None:
        self._loader = loader
        self.epoch = epoch
        self.sampler_state = sampler_state
        self.finished = False
        self._copier = loader._copier
        self._dynamic = loader.config.mode == "dynamic"
        # Ordered modes: the epoch index of the next batch to yield. Dynamic: batches yielded.
        self.yielded = start
        count = loader._replicas.size
        self._streams: list[EpochStream] = []
        self._first: list[int] = []  # per replica: the first batch its stream sends
        self._ended = [False] * count
        self._turn = 0
        # Dynamic mode: per replica, the positions this loader took (told to a restarted server).
        self._taken = [bytearray(0) for _ in range(count)]
        try:
            for r in range(count):
                self._streams.append(self._open(r, self.yielded, loader.config.timeout))
                self._first.append(int(self._streams[r].start.first_batch))
        except BaseException:
            self.close()
            raise
        start_frame = self._streams[0].start
        self._num_batches = int(start_frame.num_batches)
        # torch's RandomSampler draws the permutation from the generator on the
        # first batch; leave the generator where that draw would.
        if loader.generator is not None and start_frame.state_after_order:
            loader.generator.set_state(_state(start_frame.state_after_order))

    def _open(self, r: int, start: int, timeout: float) -> EpochStream:
        cfg, loader = self._loader.config, self._loader
        shm = loader._use_shm is not None and loader._use_shm[r]
        return EpochStream(
            loader._replicas.replicas[r].channel,
            _pb2.OpenStream(
                dataset=cfg.dataset,
                batch_size=cfg.batch_size,
                shuffle=cfg.shuffle,
                sampler_state=self.sampler_state,
                drop_last=cfg.drop_last,
                collate=cfg.collate_fn,
                epoch=self.epoch,
                start_batch=start,
                credits=loader._credits_per_stream(),
                chunk_bytes=cfg.chunk_bytes,
                transport=_pb2.TRANSPORT_SHM if shm else _pb2.TRANSPORT_BYTES,
                mode=_MODES[cfg.mode],
                job=cfg.job,
                rank=cfg.rank,
                world_size=cfg.world_size,
                seed=loader.seed,
                replica_index=r,
                num_replicas=loader._replicas.size,
                taken=bytes(self._taken[r]) if self._dynamic else b"",
            ),
            pool=loader._pool,
            copier=self._copier,
            segments=loader._segments if shm else None,
            timeout=timeout,
            metadata=loader._replicas.security.metadata,
        )

    def _where(self, r: int) -> str:
        replicas = self._loader._replicas
        address = replicas.replicas[r].address
        return f"replica {r} of {replicas.size} ({address})" if replicas.size > 1 else f"server {address}"

    def _reconnect(self, r: int, cause: ServerUnavailable) -> None:
        """Reopen replica ``r`` at the next batch not yet yielded, with backoff within ``timeout``."""
        timeout = self._loader.config.timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        self._streams[r].close()
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
                    self._streams[r] = self._open(r, self.yielded, remaining)
                    self._first[r] = int(self._streams[r].start.first_batch)
                    log.info("reconnected to %s at batch %d", self._where(r), self.yielded)
                    return
            except (ServerUnavailable, BatchTimeout):
                pass
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(2 * delay, 2.0)

    def _next_from(self, r: int, wait: float | None = None) -> Batch | object | None:
        """Replica ``r``'s next batch (None at its end, PENDING after ``wait``), reconnecting."""
        while True:
            try:
                return self._streams[r].next(wait)
            except ServerUnavailable as exc:
                self._reconnect(r, exc)
            except BatchTimeout as exc:
                # Nothing for ``timeout``: a slow server, or a dead link that keepalive has
                # not reported yet. Tell them apart with one quick question.
                if self._loader._replicas.refresh(r, _ALIVE_CHECK) is None:
                    timeout = self._loader.config.timeout
                    raise ServerUnavailable(
                        f"{self._where(r)} unreachable: no batch within timeout={timeout}s and no answer "
                        f"since (epoch {self.epoch}, after batch {self.yielded})"
                    ) from exc
                raise

    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        batch = self._next_dynamic() if self._dynamic else self._next_ordered()
        if batch is None:
            self.finished = True
            gen = self._loader.generator
            if gen is not None and self._streams[0].start.state_after_epoch:
                gen.set_state(_state(self._streams[0].start.state_after_epoch))
            raise StopIteration
        self.yielded += 1
        if self._copier is not None and batch.event is not None:
            return self._copier.hand_over(batch.data, batch.event)
        return batch.data

    def _next_ordered(self) -> Batch | None:
        replicas = len(self._streams)
        while self.yielded < self._num_batches:
            index = self.yielded
            r = index % replicas
            if index < self._first[r]:
                self.yielded += 1  # shared mode, joined late: that replica's job is past it
                continue
            batch = self._next_from(r)
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

    def _next_dynamic(self) -> Batch | None:
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
                self._mark_taken(r, item.index // len(self._streams))
                return item
            else:
                if time.monotonic() >= deadline:
                    raise BatchTimeout(
                        f"no batch from any of {len(live)} replicas within "
                        f"timeout={self._loader.config.timeout}s"
                    )

    def _mark_taken(self, r: int, position: int) -> None:
        bitmap = self._taken[r]
        if len(bitmap) <= position // 8:
            bitmap.extend(bytes(position // 8 + 1 - len(bitmap)))
        bitmap[position // 8] |= 1 << (position % 8)

    def __len__(self) -> int:
        return len(self._loader)

    def close(self) -> None:
        for stream in self._streams:
            stream.close()

    def __del__(self) -> None:
        # A finalizer must not wait: the streams close on the clean-up thread.
        with contextlib.suppress(Exception):  # module globals may be gone at shutdown
            for stream in getattr(self, "_streams", ()):
                stream.close_soon()


def _state(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
