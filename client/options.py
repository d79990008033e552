"""A loader's settings: built once from torch's arguments, every check in one place.

:meth:`LoaderConfig.build` takes the arguments a :class:`~batchferry.client.DataLoader`
was called with, checks each (an :class:`~batchferry.errors.InvalidArgument` naming
it), applies torch's rules for how they combine, and returns the one object passed
down from there. The fields that travel to the server are marked ``wire=`` below:
:func:`open_request` generates the ``OpenStream`` of every stream from those marks,
so a setting is named here once, not copied field by field on its way out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from batchferry import codec, protocol, wire
from batchferry.errors import InvalidArgument
from batchferry.v1 import loader_pb2 as _pb2

from .stats import log_interval

__all__ = ["COMPRESSIONS", "COMPRESSION_ENV", "NO_LIMIT", "TRANSPORTS", "LoaderConfig", "open_request"]

TRANSPORTS = ("auto", "grpc", "shm")
COMPRESSIONS = ("none", "lz4", "zstd", "auto")
# The codec of loaders that pass compression=None, so a whole run (a test suite, a job's
# trainers) can turn compression on without changing its code.
COMPRESSION_ENV = "BATCHFERRY_COMPRESSION"
NO_LIMIT = 365 * 24 * 3600.0  # timeout=0, as in torch: wait as long as it takes
_PREFETCH = 4  # frames in flight when prefetch_factor is not given
_MAX_PREFETCH = 64
_MAX_STREAMS = 16
_TOKEN_BYTES = 16  # a consumer's random token: no two loaders of a job draw the same


def _wire(name: str, encode: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Field metadata: the OpenStream field this setting fills (through ``encode``)."""
    return {"wire": name, "encode": encode}


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """A loader's settings, validated once (:meth:`build`) and passed down as one object."""

    # The server(s), as given: "host:port", "a:1, b:2" (replicas), or "dns:///NAME:PORT".
    address: str
    dataset: str = field(metadata=_wire("dataset"))
    # Samples per batch the server builds (1 with a batch_sampler: each list is a batch).
    batch_size: int = field(default=1, metadata=_wire("batch_size"))
    shuffle: bool = field(default=False, metadata=_wire("shuffle"))
    drop_last: bool = field(default=False, metadata=_wire("drop_last"))
    collate_fn: str = field(default="default", metadata=_wire("collate"))
    pin_memory: bool = False
    device: torch.device | None = None
    prefetch_factor: int = _PREFETCH
    timeout: float = 60.0
    log_stats_every: float = 0.0  # seconds between stats log lines (0: off)
    transport: str = "auto"
    chunk_bytes: int = field(default=0, metadata=_wire("chunk_bytes"))
    mode: str = field(default="independent", metadata=_wire("mode", protocol.MODE_VALUES.__getitem__))
    job: str = field(default="", metadata=_wire("job"))
    rank: int = field(default=0, metadata=_wire("rank"))
    world_size: int = field(default=1, metadata=_wire("world_size"))
    # Job modes order epoch e by seed + e, as DistributedSampler does.
    seed: int = field(default=0, metadata=_wire("seed"))
    in_order: bool = True
    streams: int | None = None  # byte-stream connections per server (None: automatic)
    compression: str = "none"  # byte-stream payload codec (COMPRESSIONS)
    receive_processes: bool = False  # each byte stream received by a process of its own
    # torch's batch_size=None: batches of one sample, collated by itself (no batch dimension).
    unbatched: bool = field(default=False, metadata=_wire("unbatched"))
    # An IterableDataset is iterated by this many iterators, as torch's workers (docs/iterable.md).
    num_workers: int = field(default=0, metadata=_wire("num_iterators"))
    # Who this loader is to a dynamic job's server, through reconnects and epochs (a copy
    # of the loader is another consumer): what a restarted server keeps its batches for.
    consumer_token: bytes = field(
        default_factory=lambda: os.urandom(_TOKEN_BYTES), metadata=_wire("consumer"), repr=False
    )

    @property
    def any_order(self) -> bool:
        """Batches are taken as they come: dynamic mode, or ``in_order=False``."""
        return self.mode == "dynamic" or not self.in_order

    @classmethod
    def build(cls, address: str, arguments: Mapping[str, Any]) -> LoaderConfig:
        """The settings for a DataLoader called with ``arguments`` (its parameters by name);
        ``address`` is the replica set's description of the address argument."""
        a = arguments
        mode = a["mode"]
        if mode not in protocol.MODES:
            raise _bad("mode", mode, f"must be one of {protocol.MODES}")
        seed, generator = a["seed"], a["generator"]
        if generator is not None and seed is not None:
            raise InvalidArgument("give generator or seed, not both")
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise _bad("generator", generator, "must be a CPU torch.Generator")
        if seed is not None and not _is_int(seed):
            raise _bad("seed", seed, "must be an integer")
        if mode != "independent" and generator is not None:
            raise InvalidArgument(
                f"{mode} mode orders epoch e by seed + e, as DistributedSampler does: "
                "pass seed=, not generator="
            )
        unbatched = a["batch_size"] is None and a["batch_sampler"] is None
        batch_size, shuffle = torch_batching(
            a["batch_size"], a["shuffle"], a["sampler"], a["batch_sampler"], a["drop_last"], mode
        )
        collate = a["collate_fn"]
        if callable(collate):
            raise InvalidArgument(
                "collate_fn: a function cannot be sent to the server (nothing on the wire is code); "
                "register it in the server (register_collate, batchferry serve --import) and pass its "
                "name, or pass batch_transform= for code that must run here in the trainer"
            )
        if collate is not None and (not isinstance(collate, str) or not collate):
            raise _bad("collate_fn", collate, "must be the name of a collate registered on the server")
        if unbatched and collate in (None, "default"):
            collate = (
                protocol.CONVERT_COLLATE
            )  # torch's collate without batching: default_convert, per sample
        workers = a["num_workers"]
        if workers is not None and (not _is_int(workers) or workers < 0):
            raise InvalidArgument(
                "num_workers option should be non-negative; use num_workers=0 to disable multiprocessing."
            )
        if not isinstance(a["drop_last"], bool):
            raise InvalidArgument(f"drop_last should be a boolean value, but got drop_last={a['drop_last']}")
        transform = a["batch_transform"]
        if transform is not None and not callable(transform):
            raise InvalidArgument(f"batch_transform must be callable, got {type(transform).__name__}")
        for name in ("in_order", "receive_processes"):
            if not isinstance(a[name], bool):
                raise _bad(name, a[name], "must be a bool")
        prefetch = _PREFETCH if a["prefetch_factor"] is None else a["prefetch_factor"]
        if not _is_int(prefetch) or not 1 <= prefetch <= _MAX_PREFETCH:
            raise _bad("prefetch_factor", prefetch, f"must be an integer in [1, {_MAX_PREFETCH}]")
        timeout = a["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise _bad("timeout", timeout, "must be a number of seconds >= 0 (0: no limit, as in torch)")
        every = log_interval(a["log_stats_every"])
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 <= every < math.inf:
            raise _bad("log_stats_every", every, "must be a number of seconds >= 0 (0: off)")
        if a["transport"] not in TRANSPORTS:
            raise _bad("transport", a["transport"], f"must be one of {TRANSPORTS}")
        compression = a["compression"]
        if compression is None:
            compression = os.environ.get(COMPRESSION_ENV, "").strip() or "none"
            if compression not in COMPRESSIONS:
                raise InvalidArgument(f"environment {COMPRESSION_ENV}: must be one of {COMPRESSIONS}, "
                                      f"got {compression!r}")  # fmt: skip
        if compression not in COMPRESSIONS:
            raise _bad("compression", compression, f"must be None or one of {COMPRESSIONS}")
        if compression != "none":
            codec.load()  # ImportError naming the extra to install, now rather than mid-epoch
        job = a["job"] or ""
        if mode != "independent" and (not isinstance(job, str) or not job):
            raise _bad("job", job, f"must name the job in {mode} mode (any string its consumers share)")
        rank, world_size = _world(mode, a["rank"], a["world_size"])
        for name, value in (("rank", rank), ("world_size", world_size)):
            if not _is_int(value):
                raise _bad(name, value, "must be an integer")
        if world_size < 1:
            raise _bad("world_size", world_size, "must be >= 1")
        if not 0 <= rank < world_size:
            raise _bad("rank", rank, f"must be in [0, world_size={world_size})")
        streams = a["streams"]
        if streams is not None and (not _is_int(streams) or not 1 <= streams <= _MAX_STREAMS):
            raise _bad("streams", streams, f"must be an integer in [1, {_MAX_STREAMS}]")
        if streams not in (None, 1) and mode not in ("independent", "sharded"):
            raise _bad("streams", streams, f"must be 1 in {mode} mode (the job's consumers share one order)")
        chunk = a["chunk_bytes"]
        if not _is_int(chunk) or (chunk and not wire.MIN_CHUNK_BYTES <= chunk <= wire.MAX_CHUNK_BYTES):
            raise _bad(
                "chunk_bytes", chunk, f"must be 0 or in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}]"
            )
        if not isinstance(a["dataset"], str) or not a["dataset"]:
            raise _bad("dataset", a["dataset"], "must be a non-empty name")
        pin_device = a["pin_memory_device"]
        if pin_device and not a["device"] and torch.cuda.is_available():
            device(pin_device)  # checked; pinned host memory serves every GPU
        return cls(
            address=address,
            dataset=a["dataset"],
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=bool(a["drop_last"]),
            collate_fn=collate if collate is not None else "default",
            pin_memory=bool(a["pin_memory"]),
            device=device(a["device"]),
            prefetch_factor=prefetch,
            timeout=NO_LIMIT if timeout == 0 else float(timeout),
            log_stats_every=every,
            transport=a["transport"],
            chunk_bytes=chunk,
            mode=mode,
            job=job,
            rank=rank,
            world_size=world_size,
            seed=seed if seed is not None else 0,
            in_order=a["in_order"],
            streams=streams,
            compression=compression,
            receive_processes=a["receive_processes"],
            unbatched=unbatched,
            num_workers=workers or 0,
        )


def open_request(config: LoaderConfig, **stream: Any) -> _pb2.OpenStream:
    """The OpenStream for one stream: the config's wire fields, and ``stream``'s own
    (where it starts, its credits, transport, replica and stripe, ...)."""
    settings = {}
    for f in fields(config):
        if "wire" in f.metadata:
            value = getattr(config, f.name)
            encode = f.metadata["encode"]
            settings[f.metadata["wire"]] = encode(value) if encode is not None else value
    return _pb2.OpenStream(**settings, **stream)


def torch_batching(
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
    if batch_size is None and drop_last:
        raise InvalidArgument(
            "batch_size=None option disables auto-batching and is mutually exclusive with drop_last"
        )
    if batch_size is None:
        batch_size = 1  # each "batch" is one sample, converted without a batch dimension
    if not _is_int(batch_size) or batch_size < 1:
        raise _bad("batch_size", batch_size, "must be a positive integer")
    if (sampler is not None or batch_sampler is not None) and mode != "independent":
        raise InvalidArgument(
            f"sampler and batch_sampler choose one loader's batches: not in {mode} mode, where the "
            "job's consumers share one order (use mode='independent', or DistributedSampler as sampler=)"
        )
    return batch_size, bool(shuffle)


def device(value: str | torch.device | None) -> torch.device | None:
    """The CUDA device batches go to (None: they stay on the CPU)."""
    if value is None:
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device {value!r} is not a torch device") from exc
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise InvalidArgument(f"device must be None, 'cpu' or a CUDA device, got {value!r}")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device={value!r} but CUDA is not available on this machine")
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def _world(mode: str, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """rank and world_size as given, else as DistributedSampler takes them: from the
    initialised process group (torchrun and init_process_group); else 0 and 1, except that
    sharded mode with neither is refused (each rank would read the whole dataset)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (
            dist.get_world_size() if world_size is None else world_size
        )
    if mode == "sharded" and rank is None and world_size is None:
        raise InvalidArgument(
            "sharded mode needs rank and world_size: pass them, or initialise torch.distributed "
            "first (init_process_group), which DistributedSampler needs too"
        )
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(name: str, value: Any, why: str) -> InvalidArgument:
    return InvalidArgument(f"{name} {why}, got {value!r}")
