"""The frames a stream sends: start, batches (by slot name, or as raw byte chunks, or the
error a batch failed with), end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from batchferry import sampling
from batchferry.v1 import loader_pb2 as _pb2

from . import compression
from .builder import Built

__all__ = ["END", "byte_frames", "error_frames", "shm_frame", "start_frame"]

END = _pb2.ServerFrame(end=_pb2.StreamEnd()).SerializeToString()


def start_frame(num_batches: int, order: sampling.EpochOrder, first: int) -> bytes:
    return _pb2.ServerFrame(
        start=_pb2.StreamStart(
            num_batches=num_batches,
            state_after_order=order.state_after_order,
            state_after_epoch=order.state_after_epoch,
            first_batch=first,
        )
    ).SerializeToString()


def _header(built: Built) -> _pb2.BatchHeader:
    more = [_pb2.BatchPart(index=index, layout=layout) for index, layout in built.more]
    header = _pb2.BatchHeader(index=built.index, layout=built.layout, more=more)
    if built.iterator >= 0:
        header.iterator, header.iterator_state = built.iterator, built.iterator_state
    return header


def shm_frame(built: Built) -> bytes:
    """Same host: the header names the slot; the client maps it."""
    header = _header(built)
    header.slot = built.lease.name
    return _pb2.ServerFrame(batch=header).SerializeToString()


def byte_frames(
    built: Built,
    chunk: int,
    done: Callable[[], None],
    codec: _pb2.Codec = _pb2.CODEC_NONE,
    trials: compression.Trials | None = None,
) -> Iterator[bytes]:
    """Byte stream: the header, then the payload in chunks (compressed with ``codec`` when
    that pays, see server/compression.py); ``done()`` once the last chunk is out (or the
    stream ends first). Chunks are made as gRPC takes them, so a stream holds one chunk in
    server memory, not a whole batch."""
    size = built.payload_bytes
    try:
        payload = built.lease.segment.array(size)
        used, messages = compression.payload_messages(payload, chunk, codec, built.layout, trials)
        header = _header(built)
        header.num_chunks, header.codec = -(-size // chunk), used
        yield _pb2.ServerFrame(batch=header).SerializeToString()
        yield from messages
    finally:
        done()


def error_frames(built: Built, done: Callable[[], None]) -> Iterator[bytes]:
    """A batch that failed: one frame naming the error, with nothing to map or read (either
    transport); ``done()`` once it is out (or the stream ends first)."""
    assert built.error is not None
    try:
        error = _pb2.BatchError(
            type=built.error.type, message=built.error.message, traceback=built.error.traceback
        )
        header = _pb2.BatchHeader(index=built.index, error=error, iterator=max(0, built.iterator))
        yield _pb2.ServerFrame(batch=header).SerializeToString()
    finally:
        done()
