"""One epoch's batch stream from a server, read on a background thread.

The reading thread reads a batch header and then its payload: raw chunks written
straight into a pooled buffer (byte stream), or the server's shared-memory slot
mapped in place (same host). It decodes the layout into tensors viewing that
memory and, with a CUDA device, issues the copies to the GPU at once. Up to
``credits`` frames are in flight (a frame is one batch, or several small ones that
share a slot or payload): the consumer grants one more credit per frame it has
taken every batch of.

Who owns a slot (same host)::

    sent ──▶ HELD here ──(nothing views the batch any more)──▶ released to the server
                 └──(still viewed two steps after it was handed out, or when the
                     stream ends)──▶ copied into private memory in place, then released

On the CPU, batches are views of the slot itself (no copy). Their lifetime is
tracked with a weak reference to the numpy view under them. A batch the caller
keeps is copied out once, at the same addresses (:func:`batchferry.shm.privatize`),
so the server gets its slot back and the caller's tensors keep their values.
Where that is impossible the slot is detached instead: the server replaces it in
its ring and the memory stays here until the batch is dropped. With CUDA a slot is
released once its device copies have completed; with pinned host batches it is
copied into the pinned pool and released at once.

A batch the server's dataset failed to build comes as an error frame in its place:
a :class:`Batch` without data whose ``error`` the loader raises when the loop takes
it (taking its credit like any frame); the stream goes on.

States: OPEN -> STARTED (StreamStart received) -> RECEIVING -> ENDED | FAILED | CLOSED.
:meth:`EpochStream.close` may wait (bounded); finalizers use :meth:`close_soon`.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch

from batchferry import cleanup, shm, wire
from batchferry import layout as _layout
from batchferry.errors import (
    BatchTimeout,
    ProtocolError,
    ServerUnavailable,
    from_rpc_error,
)
from batchferry.relay.parent import ReceiverProcess
from batchferry.v1 import loader_pb2 as _pb2

from .buffers import BufferPool, tracked
from .device import CudaCopier
from .frames import Batch, decode, failed
from .segments import SegmentCache

__all__ = ["PENDING", "EpochStream"]

_END = object()
# next(wait=...) found no batch within ``wait`` seconds (the stream is fine).
PENDING = object()
_POLL = 0.05  # seconds between looks for dropped batches while waiting
# A receiver process with little /dev/shm may hold just one slot, which the batch the loop
# still holds views: after this long waiting, kept batches are copied out to free it.
_STARVED = 0.25
CLOSE_GRACE = 2.0  # seconds the server gets to end a stream we close early
_JOIN = 5.0


class _OwnerLost(Exception):
    """The process that owned a slot ended, and its slots with it."""


@dataclass
class _Viewed:
    """A zero-copy batch's slot, held until nothing views it."""

    name: str
    mapping: np.ndarray  # the whole mapping: kept alive here until the slot goes back
    nbytes: int
    view: Callable[[], object]  # dead once nothing views the batch
    handed: int = -1  # the step at which the caller got it (-1: not yet)


class EpochStream:
    """Owns one StreamBatches call and its frame-reading thread; close() ends both."""

    def __init__(
        self,
        channel: grpc.Channel | ReceiverProcess,
        open_msg: _pb2.OpenStream,
        *,
        pool: BufferPool,
        copier: CudaCopier | None,
        segments: SegmentCache | None,
        timeout: float,
        metadata: tuple[tuple[str, str], ...] = (),
        server: str = "",
    ) -> None:
        self._pool = pool
        self._where = f"in batchferry server {server}" if server else "in batchferry server"
        self._dataset = open_msg.dataset
        self._copier = copier
        self._segments = segments
        self._timeout = timeout
        self._codec = open_msg.compression  # a batch comes with it or raw
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
        # A frame's batches arrive as one list: one hand-over per frame, not per batch.
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._unread: collections.deque[Batch] = collections.deque()  # of the frame taken last
        self._closed = False
        self._stopped = False
        self._half_closed = False
        self._starved_since: float | None = None  # waiting for a batch since (relayed streams)
        # What frees a starved receiver's slots: this stream's kept batches copied out; the
        # loader makes it every stream's (a receiver may wait for room another one holds).
        self.on_starved: Callable[[], None] = self.copy_out_kept
        self._saw_end = False
        # Zero-copy slots by batch index, until nothing views their batch.
        self._viewed: dict[int, _Viewed] = {}
        self._step = 0
        self._viewed_lock = threading.Lock()
        requests = iter(self._requests.get, None)
        self._call: Any
        self._relayed = isinstance(channel, ReceiverProcess)
        if isinstance(channel, ReceiverProcess):  # received in a process of its own, into slots there
            self._call = channel.open(requests)
        else:
            call = channel.stream_stream(
                wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None
            )
            self._call = call(requests, wait_for_ready=True, metadata=metadata)
        self._thread = threading.Thread(target=self._read_frames, name="batchferry-frame-reader", daemon=True)
        self._thread.start()
        self.start = self._take_start()

    def _take_start(self) -> _pb2.StreamStart:
        item = self._get()
        if not isinstance(item, _pb2.StreamStart):
            self.close()
            raise ProtocolError("server did not begin the stream with a start frame")
        return item

    # -- frame-reading thread ----------------------------------------------------------------
    def _read_frames(self) -> None:
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
                    self._ready.put(_END)
                    continue
                if kind != "batch" or self._saw_end:
                    raise ValueError("expected a batch header frame")
                header = frame.batch
                if header.HasField("error"):
                    self._ready.put(
                        [failed(header, f"{self._where} (dataset {self._dataset!r}, batch {header.index})")]
                    )
                    continue
                self._ready.put(self._from_slot(header) if header.slot else self._assemble(header, responses))
            if not self._saw_end and not self._closed:
                raise ValueError("stream ended without an end frame")
        except grpc.RpcError as exc:
            if not self._closed:
                self._ready.put(from_rpc_error(exc))
        except _OwnerLost as exc:
            if not self._closed:
                self._ready.put(ServerUnavailable(str(exc)))
                self._call.cancel()
        except (ValueError, StopIteration, _layout.LayoutError) as exc:
            if not self._closed:
                self._ready.put(ProtocolError(f"malformed stream from server: {exc}"))
                self._call.cancel()
        except BaseException as exc:  # surface anything else in the consumer, don't lose it
            self._ready.put(exc)

    def _assemble(self, header: _pb2.BatchHeader, responses: Iterator[bytes]) -> list[Batch]:
        buffer = self._pool.acquire(wire.stream_payload_bytes(header))
        # Straight into the pooled (pinned) buffer: no copy besides a decompression.
        wire.read_payload(header, responses, buffer.numpy(), self._codec)
        return self._from_buffer(header, buffer)

    def _from_buffer(self, header: _pb2.BatchHeader, buffer: Any) -> list[Batch]:
        """A frame's batches assembled in a pooled buffer; with CUDA, their copies are issued now."""
        batches = decode(header, buffer)
        if self._copier is not None:
            for batch in batches:
                batch.data, batch.event = self._copier.copy(batch.data)
            self._pool.release_after(buffer, batches[-1].event)  # copies complete in order
        return batches

    def _from_slot(self, header: _pb2.BatchHeader) -> list[Batch]:
        if self._segments is None:
            raise ValueError("server sent a shared-memory slot on a byte stream")
        size = wire.payload_bytes(header)
        try:
            mapping = self._segments.map(header.slot)
        except OSError as exc:
            if self._relayed:  # the receiver ended, and its slots went with it: reconnect
                raise _OwnerLost(f"cannot map slot {header.slot} of the receiver process: {exc}") from exc
            if shm.owner_gone(header.slot):  # a frame sent just before the server died: reconnect
                raise _OwnerLost(f"cannot map slot {header.slot} of a server that has ended: {exc}") from exc
            raise ValueError(f"cannot map slot {header.slot}: {exc}") from exc
        if size > mapping.nbytes:
            raise ValueError(f"batch {header.index} spans {size} bytes of a {mapping.nbytes}-byte slot")
        if self._copier is None and not self._pool.pin:
            # Zero copy: the batches view the slot; it goes back once none is referenced.
            view, ref = tracked(mapping[:size])
            with self._viewed_lock:
                self._viewed[header.index] = _Viewed(header.slot, mapping, size, ref)
            return decode(header, view)
        if self._copier is not None and self._segments.is_registered(header.slot):
            # Page-locked in place: copy to the device straight from the slot.
            batches = decode(header, torch.from_numpy(mapping[:size]))
            for batch in batches:
                batch.data, batch.event = self._copier.copy(batch.data)
            self._releases.put((batches[-1].event, header.index))
            return batches
        buffer = self._pool.acquire(size)
        buffer.numpy()[:] = mapping[:size]  # the one copy: out of the slot, which goes straight back
        self._release(header.index)
        return self._from_buffer(header, buffer)

    def _send(self, msg: _pb2.ClientMessage) -> None:
        if not self._half_closed:
            self._requests.put(msg.SerializeToString())

    def send_batches(self, lists: _pb2.BatchIndices) -> None:
        """The samples of batches this stream is to build (the caller's own sampler)."""
        self._send(_pb2.ClientMessage(batches=lists))

    def _release(self, index: int) -> None:
        self._send(_pb2.ClientMessage(release=_pb2.Release(index=index)))

    def _release_loop(self) -> None:
        while (item := self._releases.get()) is not None:
            event, index = item
            event.synchronize()
            self._release(index)

    # -- zero-copy slots ----------------------------------------------------------------
    def _settle(self, *, kept_after: int | None) -> None:
        """Release the slots of dropped batches. Batches still viewed that were handed out
        ``kept_after`` or more steps ago (None: none) are copied out, and their slots released."""
        with self._viewed_lock:
            dropped = {index for index, viewed in self._viewed.items() if viewed.view() is None}
            if kept_after is not None:
                for index, viewed in sorted(self._viewed.items()):
                    if index not in dropped and 0 <= viewed.handed <= self._step - kept_after:
                        del self._viewed[index]
                        self._let_go(index, viewed)
            for index in sorted(dropped):  # oldest first
                if self._viewed.pop(index, None) is not None:
                    self._release(index)

    def _let_go(self, index: int, viewed: _Viewed) -> None:
        """A batch the caller keeps: copy it out in place, or hand the slot over (detach)."""
        assert self._segments is not None
        # Either way this mapping no longer shows the slot: map it afresh next time.
        self._segments.forget(viewed.name)
        if shm.privatize(viewed.mapping, viewed.nbytes):
            self._release(index)
        else:
            self._send(_pb2.ClientMessage(detach=_pb2.Release(index=index)))

    def _half_close(self) -> None:
        """Give back every slot (copying out what is still viewed), then half-close: the
        server ends the call once it has read everything before."""
        if self._releaser is not None:
            self._releases.put(None)
            self._releaser.join(timeout=_JOIN)  # device copies may still read slots
            self._releaser = None
        with self._viewed_lock:
            for viewed in self._viewed.values():
                if viewed.handed < 0:
                    viewed.handed = self._step  # queued, never handed out: dropped just below
        self._drain_ready()
        self._settle(kept_after=0)
        self._half_closed = True
        self._requests.put(None)

    def _drain_ready(self) -> None:
        """Drop batches received but never handed out (their views go with them)."""
        self._unread.clear()
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return

    # -- consumer side ------------------------------------------------------------------
    def _get(self, wait: float | None = None) -> Any:
        try:  # the rest of the frame taken last (close() may empty it from another thread)
            return self._unread.popleft()
        except IndexError:
            pass
        deadline = time.monotonic() + (self._timeout if wait is None else wait)
        while True:
            try:
                # Wake now and then to give back slots the caller has dropped meanwhile:
                # the server may be waiting for one to build the next batch.
                item = self._ready.get(timeout=min(_POLL, max(0.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                now = time.monotonic()
                if now >= deadline:
                    if wait is not None:
                        return PENDING
                    # The stream stays open: as after torch's timeout, the next next() waits
                    # again for the same batch.
                    raise BatchTimeout(f"no batch from the server within timeout={self._timeout}s") from None
                # Across calls: a loader polling several streams asks each for a moment only.
                self._starved_since = self._starved_since or now
                if self._relayed and now - self._starved_since >= _STARVED:
                    self.on_starved()
                self._settle(kept_after=2)
                if self._segments is not None:
                    self._segments.prune()
        self._starved_since = None
        if isinstance(item, BaseException):
            self.close()
            raise item
        if isinstance(item, list):
            if not self._closed:
                self._unread.extend(item[1:])
            return item[0]
        return item

    def next(self, wait: float | None = None) -> Batch | object | None:
        """The next batch, or None at the end of the epoch. With ``wait``, PENDING when
        none arrives within that many seconds (instead of BatchTimeout after ``timeout``)."""
        self._settle(kept_after=2)
        item = self._get(wait)
        if item is PENDING:
            return PENDING  # type: ignore[no-any-return]
        if item is _END:
            self._finish()
            return None
        with self._viewed_lock:
            self._step += 1
        if item.last:  # the frame is all handed out: the server may send another
            self._send(_pb2.ClientMessage(credit=_pb2.Credit(batches=1)))
            with self._viewed_lock:
                viewed = self._viewed.get(item.frame)
                if viewed is not None:
                    viewed.handed = self._step
        return item  # type: ignore[no-any-return]

    def _finish(self) -> None:
        """Normal end: give back every slot, then let the server end the call."""
        self._half_close()
        self._thread.join(timeout=self._timeout)
        self.close()

    def close(self, deadline: float | None = None) -> None:
        """End the stream: ask the server to stop, give back every slot (batches in flight
        included), half-close, and cancel only if the server does not end the call
        by ``deadline`` (default: a couple of seconds from now). Bounded."""
        if self._closed:
            return
        if deadline is None:
            deadline = time.monotonic() + CLOSE_GRACE
        if threading.current_thread() is not self._thread and not self._half_closed:
            if not self._saw_end and self._thread.is_alive():
                self.stop()
                self._drain_until_end(deadline)
            self._half_close()
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._closed = True
        self._call.cancel()
        self._requests.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=_JOIN)

    def copy_out_kept(self) -> None:
        """Copy out every batch handed out and still viewed, giving back its slot now."""
        self._settle(kept_after=0)

    def stop(self) -> None:
        """Ask the server to send no more (once); :meth:`close` then drains to the end."""
        if not self._stopped and not self._saw_end and not self._closed:
            self._stopped = True
            self._send(_pb2.ClientMessage(stop=_pb2.Stop()))

    def _drain_until_end(self, deadline: float) -> None:
        """After a stop: drop what is still in flight (never handed out) until the end frame."""
        self._unread.clear()
        while not self._saw_end and self._thread.is_alive() and time.monotonic() < deadline:
            try:
                item = self._ready.get(timeout=_POLL)
            except queue.Empty:
                continue
            del item  # its views die here: the slot is released below
            self._settle(kept_after=None)

    def close_soon(self) -> None:
        """For finalizers: close on the clean-up thread (a finalizer must not wait)."""
        cleanup.later(self.close)
