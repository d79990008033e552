"""gRPC method names and message framing, from the generated service descriptor.

Both directions use raw-bytes (identity) serializers: the server parses requests
itself so malformed bytes become INVALID_ARGUMENT naming the message, not an
opaque INTERNAL, and payload chunks go out as the bytes they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from batchferry import codec
from batchferry.v1 import loader_pb2 as _pb2

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "GET_SAMPLE",
    "LIST_DATASETS",
    "LIST_JOBS",
    "MAX_CHUNK_BYTES",
    "MAX_REPLICAS",
    "MIN_CHUNK_BYTES",
    "SERVICE",
    "STREAM_BATCHES",
    "parse",
    "payload_bytes",
    "read_payload",
    "stream_payload_bytes",
]

_SERVICE_DESC = _pb2.DESCRIPTOR.services_by_name["Loader"]
SERVICE = _SERVICE_DESC.full_name
LIST_DATASETS = f"/{SERVICE}/{_SERVICE_DESC.methods_by_name['ListDatasets'].name}"
STREAM_BATCHES = f"/{SERVICE}/{_SERVICE_DESC.methods_by_name['StreamBatches'].name}"
LIST_JOBS = f"/{SERVICE}/{_SERVICE_DESC.methods_by_name['ListJobs'].name}"
GET_SAMPLE = f"/{SERVICE}/{_SERVICE_DESC.methods_by_name['GetSample'].name}"

# gRPC-Python moves messages of a few MiB far faster than tens of MiB.
DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 16 << 20
# Replicas one loader reads from (a server reporting more is refused).
MAX_REPLICAS = 1024
# Largest gRPC message either side accepts: a chunk plus headroom for headers.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (1 << 20)
_MESSAGES = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Keepalive pings find a dead link (a cut cable, a vanished peer) in seconds, where TCP
# alone may wait minutes: the client then reconnects, the server frees the stream.
KEEPALIVE_S = 10
CHANNEL_OPTIONS = [
    *_MESSAGES,
    # A restarted server (a rolling update) is found again within a second, not after
    # gRPC's default backoff of up to two minutes: attempts 0.1 s apart, growing 1.6x to 1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Not a backoff: the least time one connection attempt (TCP, TLS, HTTP/2 settings) is
    # given. gRPC's default; at 100 ms, a link of 200 ms round trip took 1.1 s to connect, not 0.6.
    ("grpc.min_reconnect_backoff_ms", 20000),
    ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_S * 1000),
    ("grpc.http2.max_pings_without_data", 0),  # a stream waiting for a slow batch carries none
]
SERVER_OPTIONS = [
    *_MESSAGES,
    ("grpc.keepalive_time_ms", 2 * KEEPALIVE_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Accept the clients' pings above (the default would answer them with GOAWAY).
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    ("grpc.http2.max_pings_without_data", 0),
]

M = TypeVar("M", bound=Message)


def parse(cls: type[M], data: bytes) -> M:
    """Parse ``data`` as ``cls``; ``ValueError`` naming the message when malformed."""
    try:
        return cls.FromString(data)
    except (DecodeError, RuntimeError) as exc:
        raise ValueError(f"malformed {cls.DESCRIPTOR.name} message ({len(data)} bytes)") from exc


def payload_bytes(header: _pb2.BatchHeader) -> int:
    """A frame's payload: as long as the furthest end of its batches' bytes."""
    return max([header.layout.payload_bytes, *(part.layout.payload_bytes for part in header.more)])


def stream_payload_bytes(header: _pb2.BatchHeader) -> int:
    """A byte-stream frame's payload size, checked against what its chunks can carry (each
    at most MAX_CHUNK_BYTES, compressed or not) before anything is allocated for it."""
    size = payload_bytes(header)
    if not 0 <= size <= header.num_chunks * MAX_CHUNK_BYTES:
        raise ValueError(
            f"batch {header.index}: {size} payload bytes cannot come in {header.num_chunks} chunks"
        )
    return size


def read_payload(
    header: _pb2.BatchHeader, chunks: Iterator[bytes], target: np.ndarray, stream_codec: int
) -> None:
    """Read a byte-stream frame's ``num_chunks`` payload messages from ``chunks`` straight
    into ``target`` (uint8, exactly the payload long), decompressing as they come.
    ValueError naming the batch when the chunks do not make exactly that payload."""
    size = target.nbytes
    if header.codec not in (_pb2.CODEC_NONE, stream_codec):
        raise ValueError(
            f"batch {header.index}: codec {header.codec}, but the stream asked for {stream_codec}"
        )
    offset = 0
    for _ in range(header.num_chunks):
        chunk = next(chunks)
        if header.codec != _pb2.CODEC_NONE:
            try:
                offset += codec.decompress_into(chunk, target[offset:])
            except ValueError as exc:
                raise ValueError(f"batch {header.index}: {exc}") from None
            continue
        end = offset + len(chunk)
        if end > size:
            raise ValueError(f"batch {header.index}: chunks exceed the {size}-byte payload")
        target[offset:end] = np.frombuffer(chunk, dtype=np.uint8)
        offset = end
    if offset != size:
        raise ValueError(f"batch {header.index}: got {offset} of {size} payload bytes")
