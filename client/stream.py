"""One epoch's batch stream from a server, received on a background thread.

The receiver reads a batch header and then its payload: raw chunks written
straight into a pooled buffer (byte stream), or the server's shared-memory slot
mapped in place (same host). It decodes the layout into tensors viewing that
memory and, with a CUDA device, issues the copies to the GPU at once. Up to
``credits`` batches are in flight: the consumer grants one more credit per batch.

Same host, on the CPU, batches are views of the slot itself (no copy). Such a
slot is HELD until nothing references its memory any more, then RELEASED to the
server; a slot still referenced long after (the caller keeps batches) or at the
end of the stream is DETACHED: the server replaces it in its ring and the memory
stays with this process until the caller drops the batch. With CUDA a slot is
released once its device copies have completed; with pinned host batches it is
copied into the pinned pool and released at once.

States: OPEN -> STARTED (StreamStart received) -> RECEIVING -> ENDED | FAILED | CLOSED.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from batchferry import layout as _layout
from batchferry import wire
from batchferry.errors import BatchTimeout, ProtocolError, from_rpc_error
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool, storage_use_count
from .device import CudaCopier
from .segments import SegmentCache

__all__ = ["PENDING", "Batch", "EpochStream"]

_END = object()
# next(wait=...) found no batch within ``wait`` seconds (the stream is fine).
PENDING = object()
_HELD_POLL = 0.05  # seconds between checks for dropped zero-copy batches while waiting
_CLOSE_GRACE = 2.0  # seconds the server gets to end a stream we close early


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
        segments: SegmentCache | None,
        timeout: float,
    ) -> None:
        self._pool = pool
        self._copier = copier
        self._segments = segments
        self._timeout = timeout
        # (event, index) of slots whose device copies are in flight (same host + CUDA).
        self._releases: queue.SimpleQueue[tuple[Any, int] | None] = queue.SimpleQueue()
        self._releaser: threading.Thread | None = None
        if segments is not None and copier is not None:
            self._releaser = threading.Thread(
                target=self._release_loop, name="batchferry-release", daemon=True
            )
            self._releaser.start()
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._requests.put(_pb2.ClientMessage(open=open_msg).SerializeToString())
        self._ready: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._saw_end = False
        # Zero-copy slots: index -> (slot name, a view of the slot, its use count unreferenced).
        self._held: dict[int, tuple[str, torch.Tensor, int]] = {}
        self._handed: dict[int, int] = {}  # index -> step at which the caller got it
        self._step = 0
        self._held_lock = threading.Lock()
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
                kind = frame.WhichOneof("kind")
                if kind == "end":
                    self._saw_end = True
                    self._finish_releases()
                    self._ready.put(_END)
                    continue
                if kind != "batch":
                    raise ValueError("expected a batch header frame")
                if frame.batch.slot:
                    self._ready.put(self._from_slot(frame.batch))
                else:
                    self._ready.put(self._assemble(frame.batch, responses))
            if not self._saw_end and not self._closed:
                raise ValueError("stream ended without an end frame")
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
        return self._from_buffer(header, buffer)

    def _from_buffer(self, header: _pb2.BatchHeader, buffer: torch.Tensor) -> Batch:
        """A batch assembled in a pooled buffer; with CUDA, its copies are issued now."""
        data = _layout.decode(header.layout, buffer)
        if self._copier is None:
            return Batch(header.index, data)
        data, event = self._copier.copy(data)
        self._pool.release_after(buffer, event)
        return Batch(header.index, data, event)

    def _from_slot(self, header: _pb2.BatchHeader) -> Batch:
        if self._segments is None:
            raise ValueError("server sent a shared-memory slot on a byte stream")
        size = header.layout.payload_bytes
        try:
            segment = self._segments.get(header.slot)
        except OSError as exc:
            raise ValueError(f"cannot map slot {header.slot}: {exc}") from exc
        if size > segment.size:
            raise ValueError(f"batch {header.index} spans {size} bytes of a {segment.size}-byte slot")
        view = segment.tensor[:size]
        if self._copier is None and not self._pool.pin:
            # Zero copy: the batch views the slot; it goes back once unreferenced.
            with self._held_lock:
                self._held[header.index] = (header.slot, view, storage_use_count(view))
            data = _layout.decode(header.layout, view)
            self._poll_held()
            return Batch(header.index, data)
        if self._copier is not None and self._segments.is_registered(header.slot):
            # Page-locked in place: copy to the device straight from the slot.
            data, event = self._copier.copy(_layout.decode(header.layout, view))
            self._releases.put((event, header.index))
            return Batch(header.index, data, event)
        buffer = self._pool.acquire(size)
        buffer.copy_(view)  # the one copy: out of the slot, which goes straight back
        self._release(header.index)
        return self._from_buffer(header, buffer)

    def _release(self, index: int) -> None:
        self._requests.put(_pb2.ClientMessage(release=_pb2.Release(index=index)).SerializeToString())

    def _detach(self, index: int, name: str) -> None:
        self._requests.put(_pb2.ClientMessage(detach=_pb2.Release(index=index)).SerializeToString())
        if self._segments is not None:
            self._segments.forget(name)

    def _poll_held(self, final: bool = False) -> None:
        """Release slots nothing references. A batch still referenced two steps after the
        caller got it is being kept (a loop only holds its current and previous batch):
        detach it, as every handed-out batch still referenced when the stream ends or
        while the caller waits for a batch (``final``): the server may need the slot."""
        with self._held_lock:
            for index, (name, view, baseline) in list(self._held.items()):
                if storage_use_count(view) <= baseline:
                    del self._held[index]
                    self._handed.pop(index, None)
                    self._release(index)
                elif (final and index in self._handed) or self._handed.get(
                    index, self._step
                ) < self._step - 1:
                    del self._held[index]
                    self._handed.pop(index, None)
                    self._detach(index, name)

    def _release_loop(self) -> None:
        while (item := self._releases.get()) is not None:
            event, index = item
            event.synchronize()
            self._release(index)

    def _finish_releases(self) -> None:
        """Release or detach every slot still held, then half-close so the server can end the call."""
        if self._releaser is not None:
            self._releases.put(None)
            self._releaser.join()
            self._releaser = None
        with self._held_lock:
            self._handed.update(dict.fromkeys(self._held, self._step))  # nothing more to hand out
        self._poll_held(final=True)
        self._requests.put(None)

    # -- consumer side ------------------------------------------------------------------
    def _get(self, wait: float | None = None) -> Any:
        deadline = time.monotonic() + (self._timeout if wait is None else wait)
        while True:
            try:
                # Wake now and then to give back slots the caller has dropped meanwhile:
                # the server may be waiting for one to build the next batch.
                item = self._ready.get(timeout=min(_HELD_POLL, max(0.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                if time.monotonic() >= deadline:
                    if wait is not None:
                        return PENDING
                    self.close()
                    raise BatchTimeout(f"no batch from the server within timeout={self._timeout}s") from None
                self._poll_held(final=True)
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def next(self, wait: float | None = None) -> Batch | object | None:
        """The next batch, or None at the end of the epoch. With ``wait``, PENDING when
        none arrives within that many seconds (instead of BatchTimeout after ``timeout``)."""
        self._poll_held()
        item = self._get(wait)
        if item is PENDING:
            return PENDING  # type: ignore[no-any-return]
        if item is _END:
            self._finish()
            return None
        self._requests.put(_pb2.ClientMessage(credit=_pb2.Credit(batches=1)).SerializeToString())
        with self._held_lock:
            self._step += 1
            if item.index in self._held:
                self._handed[item.index] = self._step
        return item  # type: ignore[no-any-return]

    def _finish(self) -> None:
        """Normal end: the server ends the call once it has our releases; don't cancel
        it before then, or it would treat the slots as abandoned."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._timeout)
        self.close()

    def close(self) -> None:
        """End the stream early. Half-close first, so the server reads every message we
        sent (acknowledgements, releases) before it ends the call; cancel only if it
        does not end it promptly."""
        if self._closed:
            return
        self._closed = True
        if not self._saw_end and threading.current_thread() is not self._thread:
            self._poll_held()
            self._requests.put(None)
            self._thread.join(timeout=_CLOSE_GRACE)
        if self._releaser is not None:
            # Device copies may still read slots; let them finish before the
            # server may reuse those slots.
            self._releases.put(None)
            self._releaser.join(timeout=10)
        self._call.cancel()
        self._requests.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        # The server detaches what this stream still held; stop caching those mappings.
        with self._held_lock:
            held, self._held = list(self._held.values()), {}
        if self._segments is not None:
            for name, _, _ in held:
                self._segments.forget(name)
