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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from batchferry import sampling, wire
from batchferry.errors import BatchTimeout, InvalidArgument, NotFound, ServerUnavailable, from_rpc_error
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool
from .device import CudaCopier
from .segments import SegmentCache, probe
from .stream import EpochStream

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


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """A loader's settings, validated once and passed down as one object."""

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
        address: ``"host:port"`` of a batchferry server.
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

    Batches have the structure the collate returns (tuples of samples collate to
    lists, as in torch). Errors are raised from :mod:`batchferry.errors`.
    """

    def __init__(
        self,
        address: str,
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
        self.config = LoaderConfig(
            address=address,
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
        self._info: _pb2.ListDatasetsResponse | None = None
        self._length: int | None = None
        self._use_shm: bool | None = None
        self._channel = grpc.insecure_channel(address, options=wire.CHANNEL_OPTIONS)
        pin = (self.config.pin_memory or dev is not None) and torch.cuda.is_available()
        self._pool = BufferPool(prefetch_factor + 2, pin=pin)
        self._copier = CudaCopier(dev) if dev is not None else None
        self._segments = SegmentCache(register_with_cuda=dev is not None)

    # -- dataset facts ----------------------------------------------------------------
    def _dataset_length(self) -> int:
        if self._length is None:
            stub = self._channel.unary_unary(
                wire.LIST_DATASETS, request_serializer=None, response_deserializer=None
            )
            try:
                raw = stub(b"", timeout=self.config.timeout, wait_for_ready=True)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc)
                if err.code == "DEADLINE_EXCEEDED":
                    err = ServerUnavailable(
                        f"server {self.config.address} not reachable within {self.config.timeout}s"
                    )
                raise err from exc
            self._info = wire.parse(_pb2.ListDatasetsResponse, raw)
            infos = {d.name: d for d in self._info.datasets}
            if self.config.dataset not in infos:
                raise NotFound(
                    f"dataset {self.config.dataset!r} not found on {self.config.address}; "
                    f"it has: {', '.join(sorted(infos))}"
                )
            self._length = int(infos[self.config.dataset].length)
        return self._length

    @property
    def transport(self) -> str:
        """The transport in use: ``"shm"`` (same host) or ``"grpc"`` (byte stream)."""
        if self._use_shm is None:
            self._dataset_length()
            assert self._info is not None
            visible = probe(self._info.shm_probe, self._info.shm_token)
            if self.config.transport == "shm" and not visible:
                raise InvalidArgument(
                    f"transport='shm' needs the server's shared memory, but its segment "
                    f"{self._info.shm_probe or '(none)'} is not visible here (another host, or a "
                    f"container without the server's IPC namespace and /dev/shm); use 'auto' or 'grpc'"
                )
            self._use_shm = visible and self.config.transport != "grpc"
        return "shm" if self._use_shm else "grpc"

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
        if self._resume is not None:
            epoch, start, sampler_state = self._resume
            self._resume = None
        else:
            epoch, start = self._epoch, 0
            sampler_state = b""
            if self.config.mode == "independent":
                sampler_state = sampling.begin_iteration(self.generator, self.config.shuffle)
        self._epoch = epoch + 1
        shm = self.transport == "shm"  # fails fast (NotFound, ServerUnavailable) before a stream opens
        it = _Iterator(self, epoch, start, sampler_state, shm)
        self._active = it
        return it

    def close(self) -> None:
        """End any iteration and release the connection and buffers."""
        if self._active is not None:
            self._active.close()
            self._active = None
        self._channel.close()
        self._segments.close()
        self._pool.close()

    def __enter__(self) -> DataLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _Iterator:
    """One epoch of a DataLoader; reopens its stream if the server goes away and comes back."""

    def __init__(self, loader: DataLoader, epoch: int, start: int, sampler_state: bytes, shm: bool) -> None:
        self._loader = loader
        self.epoch = epoch
        self.sampler_state = sampler_state
        self.yielded = start
        self.finished = False
        self._shm = shm
        self._copier = loader._copier
        self._stream = self._open(start, loader.config.timeout)
        # torch's RandomSampler draws the permutation from the generator on the
        # first batch; leave the generator where that draw would.
        if loader.generator is not None and self._stream.start.state_after_order:
            loader.generator.set_state(_state(self._stream.start.state_after_order))

    def _open(self, start: int, timeout: float) -> EpochStream:
        cfg, loader = self._loader.config, self._loader
        stream = EpochStream(
            loader._channel,
            _pb2.OpenStream(
                dataset=cfg.dataset,
                batch_size=cfg.batch_size,
                shuffle=cfg.shuffle,
                sampler_state=self.sampler_state,
                drop_last=cfg.drop_last,
                collate=cfg.collate_fn,
                epoch=self.epoch,
                start_batch=start,
                credits=cfg.prefetch_factor,
                chunk_bytes=cfg.chunk_bytes,
                transport=_pb2.TRANSPORT_SHM if self._shm else _pb2.TRANSPORT_BYTES,
                mode=_MODES[cfg.mode],
                job=cfg.job,
                rank=cfg.rank,
                world_size=cfg.world_size,
                seed=loader.seed,
            ),
            pool=loader._pool,
            copier=self._copier,
            segments=loader._segments if self._shm else None,
            timeout=timeout,
        )
        # In shared mode a consumer joining late starts where the job still is.
        self.yielded = max(start, int(stream.start.first_batch))
        return stream

    def _reconnect(self, cause: ServerUnavailable) -> None:
        """Reopen at the next batch not yet yielded, retrying with backoff within ``timeout``."""
        timeout = self._loader.config.timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        self._stream.close()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"server {self._loader.config.address} did not come back within timeout={timeout}s "
                    f"(epoch {self.epoch}, after batch {self.yielded})"
                ) from cause
            try:
                self._stream = self._open(self.yielded, remaining)
                log.info("reconnected to %s at batch %d", self._loader.config.address, self.yielded)
                return
            except (ServerUnavailable, BatchTimeout):
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(2 * delay, 2.0)

    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> Any:
        if self.finished:
            raise StopIteration
        while True:
            try:
                batch = self._stream.next()
                break
            except ServerUnavailable as exc:
                self._reconnect(exc)
        if batch is None:
            self.finished = True
            gen = self._loader.generator
            if gen is not None and self._stream.start.state_after_epoch:
                gen.set_state(_state(self._stream.start.state_after_epoch))
            raise StopIteration
        self.yielded += 1
        if self._copier is not None and batch.event is not None:
            return self._copier.hand_over(batch.data, batch.event)
        return batch.data

    def __len__(self) -> int:
        return len(self._loader)

    def close(self) -> None:
        self._stream.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _state(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
