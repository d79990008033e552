"""One epoch's batch stream from a server, received on a background thread.

The receiver reads frames (a header, then raw chunks), writes the chunks straight
into a pooled buffer, decodes the layout into tensors viewing that buffer, and,
with a CUDA device, issues the copies to the GPU at once. Up to ``credits``
batches are in flight: the consumer grants one more credit per batch it takes.

States: OPEN -> STARTED (StreamStart received) -> RECEIVING -> ENDED | FAILED | CLOSED.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from batchferry import layout as _layout
from batchferry import wire
from batchferry.errors import BatchTimeout, ProtocolError, from_rpc_error
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool
from .device import CudaCopier

__all__ = ["Batch", "EpochStream"]

_END = object()


@dataclass
class Batch:
    index: int
    data: Any
    event: Any = None  # CUDA event the consumer's stream must wait on


class EpochStream:
    """Owns one StreamBatches call and its receiver thread; close() ends both."""

    def __init__(
        self,
        channel: grpc.Channel,
        open_msg: _pb2.OpenStream,
        *,
        pool: BufferPool,
        copier: CudaCopier | None,
        timeout: float,
    ) -> None:
        self._pool = pool
        self._copier = copier
        self._timeout = timeout
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._requests.put(_pb2.ClientMessage(open=open_msg).SerializeToString())
        self._ready: queue.Queue[Any] = queue.Queue()
        self._closed = False
        call = channel.stream_stream(wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None)
        self._call = call(iter(self._requests.get, None), wait_for_ready=True)
        self._thread = threading.Thread(target=self._receive, name="batchferry-receiver", daemon=True)
        self._thread.start()
        self.start = self._take_start()

    def _take_start(self) -> _pb2.StreamStart:
        item = self._get()
        if not isinstance(item, _pb2.StreamStart):
            self.close()
            raise ProtocolError("server did not begin the stream with a start frame")
        return item

    # -- receiver thread ----------------------------------------------------------------
    def _receive(self) -> None:
        responses: Iterator[bytes] = iter(self._call)
        try:
            first = wire.parse(_pb2.ServerFrame, next(responses))
            if first.WhichOneof("kind") != "start":
                raise ValueError("first frame is not 'start'")
            self._ready.put(first.start)
            for raw in responses:
                frame = wire.parse(_pb2.ServerFrame, raw)
                if frame.WhichOneof("kind") != "batch":
                    raise ValueError("expected a batch header frame")
                self._ready.put(self._assemble(frame.batch, responses))
            self._ready.put(_END)
        except grpc.RpcError as exc:
            if not self._closed:
                self._ready.put(from_rpc_error(exc))
        except (ValueError, StopIteration, _layout.LayoutError) as exc:
            if not self._closed:
                self._ready.put(ProtocolError(f"malformed stream from server: {exc}"))
                self._call.cancel()
        except BaseException as exc:  # surface anything else in the consumer, don't lose it
            self._ready.put(exc)

    def _assemble(self, header: _pb2.BatchHeader, responses: Iterator[bytes]) -> Batch:
        size = header.layout.payload_bytes
        buffer = self._pool.acquire(size)
        target = buffer.numpy()
        offset = 0
        for _ in range(header.num_chunks):
            chunk = next(responses)
            end = offset + len(chunk)
            if end > size:
                raise ValueError(f"batch {header.index}: chunks exceed the {size}-byte payload")
            target[offset:end] = np.frombuffer(chunk, dtype=np.uint8)
            offset = end
        if offset != size:
            raise ValueError(f"batch {header.index}: got {offset} of {size} payload bytes")
        data = _layout.decode(header.layout, buffer)
        if self._copier is None:
            return Batch(header.index, data)
        data, event = self._copier.copy(data)
        self._pool.release_after(buffer, event)
        return Batch(header.index, data, event)

    # -- consumer side ------------------------------------------------------------------
    def _get(self) -> Any:
        try:
            item = self._ready.get(timeout=self._timeout)
        except queue.Empty:
            self.close()
            raise BatchTimeout(f"no batch from the server within timeout={self._timeout}s") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def next(self) -> Batch | None:
        """The next batch, or None at the end of the epoch."""
        item = self._get()
        if item is _END:
            self.close()
            return None
        self._requests.put(_pb2.ClientMessage(credit=_pb2.Credit(batches=1)).SerializeToString())
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        self._requests.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
