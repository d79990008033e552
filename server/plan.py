"""An OpenStream request, checked: :func:`plan` is a pure function from the request and
the server's :class:`Catalog` to a :class:`Plan` (or an :class:`~.status.Abort` naming
the field). Nothing here touches the network, the ring or the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import grpc
import numpy as np

from batchferry import protocol, sampling, wire
from batchferry.v1 import loader_pb2 as _pb2

from .jobs import JobSettings
from .journal import MAX_TOKEN as MAX_CONSUMER_TOKEN  # journaled with each batch handed out
from .status import Abort, invalid

__all__ = ["MAX_CREDITS", "MAX_WORLD_SIZE", "Catalog", "Plan", "plan", "shown"]

MAX_CREDITS = 64
MAX_WORLD_SIZE = 1 << 16
MAX_NAME = 256  # characters in a dataset, collate or job name
MAX_STRIPES = 16  # streams one client may split a replica's part of an epoch into
MAX_ITERATOR_STATE = 1 << 20  # bytes of one iterator's saved state_dict() a resumed stream sends
# OpenStream fields a Plan takes as they are (once plan() has checked them).
_FROM_REQUEST = (
    "dataset", "batch_size", "start_batch", "credits", "groups", "unbatched", "shuffle", "drop_last",
    "seed", "taken", "any_order", "client_batches", "mode", "job", "rank", "epoch", "consumed",
    "num_iterators", "base_seed", "next_iterator", "resume", "consumer",
)  # fmt: skip


@dataclass(frozen=True)
class Catalog:
    """What a request is checked against: the server's datasets, collates and place."""

    lengths: dict[str, int]
    collates: frozenset[str]
    chunk_bytes: int
    replica: int = 0
    replicas: int = 1
    iterables: frozenset[str] = frozenset()  # the IterableDatasets (lengths: 0 when unsized)
    max_iterators: int = 64


@dataclass(frozen=True)
class Plan:
    dataset: str
    collate: str
    batch_size: int
    num_batches: int  # in the whole epoch
    start_batch: int
    credits: int
    chunk_bytes: int
    shm: bool
    # Codec asked for the payload of batches sent as bytes (each may still go raw).
    codec: _pb2.Codec = _pb2.CODEC_NONE
    groups: bool = False  # the client takes frames of several batches
    unbatched: bool = False  # batches of one sample, collated by itself (torch's batch_size=None)
    # What the epoch's order is made from (server/orders.py makes and shares it).
    length: int = 0
    shuffle: bool = False
    drop_last: bool = False
    sampler_state: bytes = b""  # independent: the client's generator state
    seed: int = 0
    world_size: int = 1
    taken: bytes = b""  # positions this consumer took before (a bitmap): dynamic, any_order
    any_order: bool = False  # send batches as they are built
    client_batches: bool = False  # the client sends every batch's samples
    mode: int = _pb2.MODE_INDEPENDENT
    job: str = ""
    rank: int = 0
    epoch: int = 0
    consumed: bytes = b""  # sharded, resized mid-epoch: the order's positions earlier worlds took
    resume: bool = False  # the consumer continues a position it had (reconnect, loaded state)
    consumer: bytes = b""  # the consumer's token (dynamic mode)
    settings: JobSettings | None = None  # job modes: what every consumer must agree on
    # Scale-out (replicas, and stripes within one): this stream carries only the batches
    # b with b % replicas == replica. Senders count positions p among those; frames,
    # releases and the client speak in whole-epoch batch indices.
    replica: int = 0
    replicas: int = 1
    # An IterableDataset: num_iterators as torch's num_workers, their seeds base_seed + id,
    # and a resumed stream's (batches taken, saved state) per iterator, next_iterator's next.
    iterable: bool = False
    num_iterators: int = 0
    base_seed: int = 0
    places: tuple[tuple[int, bytes], ...] = ()
    next_iterator: int = 0

    @property
    def mode_name(self) -> str:
        return protocol.MODE_NAMES[self.mode]

    @property
    def local_total(self) -> int:
        """This replica's batches in the epoch."""
        return self.local(self.num_batches)

    @property
    def local_start(self) -> int:
        return self.local(self.start_batch)

    def local(self, index: int) -> int:
        """This replica's batches before epoch batch ``index`` (its position when it is one of them)."""
        return (index - self.replica + self.replicas - 1) // self.replicas

    def taken_positions(self) -> np.ndarray:
        """The positions ``taken`` marks (sent before this stream opened)."""
        return protocol.Bitmap(self.taken).positions(self.local_total)

    def batch_index(self, position: int) -> int:
        """Epoch batch index of this replica's ``position``-th batch (num_batches past the end)."""
        return min(position * self.replicas + self.replica, self.num_batches)


def _left(consumed: bytes, length: int) -> int:
    """Samples of the epoch's order that ``consumed`` leaves (a bitmap over its positions)."""
    need = -(-length // 8)

    def refuse() -> Abort:
        return invalid(
            f"consumed: a bitmap over the epoch's {length} samples ({need} bytes, no bit "
            f"past the last sample), got {len(consumed)} bytes"
        )

    if len(consumed) > need:  # before unpacking: one byte becomes eight
        raise refuse()
    bits = protocol.Bitmap(consumed).bits()
    if bits[length:].any():
        raise refuse()
    return length - int(bits.sum())


def shown(name: str) -> str:
    """A client's string as an error message quotes it: never all of a huge one."""
    return repr(name) if len(name) <= 64 else repr(name[:61] + "...")


def plan(req: _pb2.OpenStream, catalog: Catalog) -> Plan:
    """Check every field of ``req``; the first problem raises an Abort naming it."""
    for field in ("dataset", "collate", "job"):
        if len(getattr(req, field)) > MAX_NAME:
            raise invalid(f"{field}: at most {MAX_NAME} characters, got {len(getattr(req, field))}")
    if not req.dataset:
        raise invalid("dataset: required")
    length = catalog.lengths.get(req.dataset)
    if length is None:
        raise Abort(
            grpc.StatusCode.NOT_FOUND,
            f"dataset {shown(req.dataset)} not found; this server has: {', '.join(sorted(catalog.lengths))}",
        )
    if req.batch_size < 1:
        raise invalid(f"batch_size must be >= 1, got {req.batch_size}")
    if req.unbatched and req.batch_size != 1:
        raise invalid(f"batch_size must be 1 when unbatched (one sample at a time), got {req.batch_size}")
    collate = req.collate or "default"
    if collate not in catalog.collates:
        raise Abort(
            grpc.StatusCode.NOT_FOUND,
            f"collate {shown(collate)} not found; registered: {', '.join(sorted(catalog.collates))}",
        )
    if req.epoch < 0:
        raise invalid(f"epoch must be >= 0, got {req.epoch}")
    if not 1 <= req.credits <= MAX_CREDITS:
        raise invalid(f"credits must be in [1, {MAX_CREDITS}], got {req.credits}")
    chunk = req.chunk_bytes or catalog.chunk_bytes
    if not wire.MIN_CHUNK_BYTES <= chunk <= wire.MAX_CHUNK_BYTES:
        raise invalid(
            f"chunk_bytes must be 0 or in [{wire.MIN_CHUNK_BYTES}, {wire.MAX_CHUNK_BYTES}], "
            f"got {req.chunk_bytes}"
        )
    if req.mode not in protocol.MODE_NAMES:
        raise invalid(f"mode: unknown value {req.mode}")
    if req.transport not in (_pb2.TRANSPORT_BYTES, _pb2.TRANSPORT_SHM):
        raise invalid(f"transport: unknown value {req.transport}")
    if req.compression not in _pb2.Codec.values():
        raise invalid(
            f"compression: unknown value {req.compression}; known: "
            + ", ".join(f"{_pb2.Codec.Name(v)} ({v})" for v in _pb2.Codec.values())
        )
    wanted = (req.replica_index, req.num_replicas or 1)
    if wanted != (catalog.replica, catalog.replicas):
        raise Abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this server is replica {catalog.replica} of {catalog.replicas}, but the stream asks for "
            f"replica {wanted[0]} of {wanted[1]}; give the loader every replica's address "
            "(or a dns:/// name that resolves to all of them)",
        )
    iterable = req.dataset in catalog.iterables
    if iterable:
        _check_iterable(req, catalog)
    elif req.places:
        raise invalid("places: only for an IterableDataset")
    count = length
    if req.client_batches and req.mode != _pb2.MODE_INDEPENDENT:
        raise invalid("client_batches: only in independent mode (a job's consumers share one order)")
    if req.any_order and req.mode not in (_pb2.MODE_INDEPENDENT, _pb2.MODE_SHARDED):
        raise invalid("any_order: only in independent and sharded modes")
    stripes = req.stripes or 1
    if not 1 <= stripes <= MAX_STRIPES or not 0 <= req.stripe < stripes:
        raise invalid(
            f"stripes must be in [1, {MAX_STRIPES}] and stripe in [0, stripes), got {req.stripe} of {stripes}"
        )
    if stripes > 1 and req.mode not in (_pb2.MODE_INDEPENDENT, _pb2.MODE_SHARDED):
        raise invalid("stripes: only in independent and sharded modes")
    if req.client_batches:
        pass  # the client's sampler decides; shuffle and sampler_state are unused
    elif req.mode == _pb2.MODE_INDEPENDENT:
        if req.shuffle and not req.sampler_state:
            raise invalid("sampler_state: required when shuffle is true")
        if req.shuffle:
            try:
                sampling.generator_from_state(req.sampler_state)
            except ValueError as exc:
                raise invalid(f"sampler_state: {exc}") from None
    else:
        mode = protocol.MODE_NAMES[req.mode]
        if not req.job:
            raise invalid(f"job: required in {mode} mode")
        if not 1 <= req.world_size <= MAX_WORLD_SIZE:
            raise invalid(f"world_size must be in [1, {MAX_WORLD_SIZE}], got {req.world_size}")
        if not 0 <= req.rank < req.world_size:
            raise invalid(f"rank must be in [0, world_size={req.world_size}), got {req.rank}")
        if req.mode == _pb2.MODE_SHARDED and not iterable:
            count = sampling.shard_length(_left(req.consumed, length), req.world_size, req.drop_last)
        elif req.consumed:
            raise invalid("consumed: only in sharded mode, of a map-style dataset")
        # shared and dynamic split the whole epoch among the job's consumers
    # With the client's own batches, or an IterableDataset, the epoch's length is known only at its end.
    open_ended = req.client_batches or iterable
    total = 0 if open_ended else sampling.num_batches(count, req.batch_size, req.drop_last)
    if open_ended and req.start_batch < 0:
        raise invalid(f"start_batch must be >= 0, got {req.start_batch}")
    if not open_ended and not 0 <= req.start_batch <= total:
        raise invalid(f"start_batch must be in [0, {total}], got {req.start_batch}")
    # A stripe is a finer split of this replica's part: with R replicas and K stripes,
    # stream (r, k) carries the batches b with b % (R * K) == r + R * k.
    part, parts = catalog.replica + catalog.replicas * req.stripe, catalog.replicas * stripes
    local_total = (total - part + parts - 1) // parts
    if req.taken and not (req.mode == _pb2.MODE_DYNAMIC or req.any_order):
        raise invalid("taken: only in dynamic mode or with any_order")
    if len(req.taken) > -(-local_total // 8):
        raise invalid(f"taken: a bitmap of at most {-(-local_total // 8)} bytes, got {len(req.taken)}")
    if len(req.consumer) > MAX_CONSUMER_TOKEN:
        raise invalid(f"consumer: a token of at most {MAX_CONSUMER_TOKEN} bytes, got {len(req.consumer)}")
    # The request's fields of the same name and meaning, then what the checks above made.
    same = {name: getattr(req, name) for name in _FROM_REQUEST}
    the_plan = Plan(
        **same,
        collate=collate,
        num_batches=total,
        chunk_bytes=chunk,
        shm=req.transport == _pb2.TRANSPORT_SHM,
        codec=req.compression,
        length=length,
        sampler_state=req.sampler_state if req.shuffle else b"",
        world_size=max(1, req.world_size),
        replica=part,
        replicas=parts,
        iterable=iterable,
        places=tuple((p.batches, p.state) for p in req.places),
    )
    if not iterable:  # what a map-style stream's consumers must agree on leaves it out
        the_plan = replace(the_plan, num_iterators=0, base_seed=0, next_iterator=0)
    if req.mode == _pb2.MODE_INDEPENDENT:
        return the_plan
    # What every consumer of a job must agree on: those of the plan's settings.
    agreed = {f.name: getattr(the_plan, f.name) for f in fields(JobSettings)}
    return replace(the_plan, settings=JobSettings(**agreed))


def _check_iterable(req: _pb2.OpenStream, catalog: Catalog) -> None:
    """What a stream of an IterableDataset may ask for: torch's refusals, and its iterators."""
    if req.shuffle:
        raise invalid(
            "shuffle: an IterableDataset has no order to shuffle (torch's DataLoader refuses "
            "shuffle=True for one too); shuffle inside the dataset"
        )
    if req.client_batches:
        raise invalid("batches: an IterableDataset takes no sampler or batch_sampler, as in torch")
    if req.mode == _pb2.MODE_DYNAMIC:
        raise invalid(
            "mode: dynamic mode hands each batch index of an epoch to one consumer; an IterableDataset "
            "has no indices: use sharded mode (each rank its own stream) or shared mode"
        )
    if req.any_order:
        raise invalid("any_order: an IterableDataset's batches come in torch's round-robin order")
    if (req.stripes or 1) > 1:
        raise invalid("stripes: an IterableDataset is read by one stream")
    if catalog.replicas > 1:
        raise Abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this server is replica {catalog.replica} of {catalog.replicas}: an IterableDataset is "
            "served by one server (every replica would iterate all of it)",
        )
    if not 0 <= req.num_iterators <= catalog.max_iterators:
        raise invalid(
            f"num_iterators (the loader's num_workers) must be in [0, {catalog.max_iterators}] "
            f"(the server's max_iterators), got {req.num_iterators}"
        )
    n = max(1, req.num_iterators)
    if req.places and len(req.places) != n:
        raise invalid(f"places: one per iterator ({n}), got {len(req.places)}")
    for i, place in enumerate(req.places):
        if place.batches < 0 or len(place.state) > MAX_ITERATOR_STATE:
            raise invalid(
                f"places[{i}]: batches must be >= 0 and state at most {MAX_ITERATOR_STATE} bytes, "
                f"got {place.batches} and {len(place.state)} bytes"
            )
    if not 0 <= req.next_iterator < n:
        raise invalid(f"next_iterator must be in [0, {n}), got {req.next_iterator}")
