"""A process of its own receiving a loader's byte streams into shared memory.

One process can receive only so much: gRPC-Python turns every payload message into
Python bytes under the interpreter lock, and a loader's lock is also its training
loop's. With ``receive_processes=True`` each byte stream is received here instead:
this process reads a frame's payload chunks straight into a shared-memory slot it
owns (decompressing them there) and passes the loader only the frame's header, now
naming the slot. The loader maps the slot as it maps a same-host server's: zero-copy
on the CPU, page-locked in place for CUDA copies. The loader's releases and detaches
come back here; its credits, stops and index lists go on to the server unchanged.

Run as ``python -m batchferry.relay.child FD`` by :mod:`batchferry.relay.parent`,
speaking :class:`~batchferry.relay.link.Link` messages over the inherited socket ``FD``. It loads neither
torch nor the client. It ends when the socket does (its loader is gone, however it
ended), and an :class:`~batchferry.shm.Arena` reaper removes its slots however this
process ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from batchferry import shm, wire
from batchferry.v1 import loader_pb2 as _pb2

from .link import (
    CANCEL,
    DONE,
    ERROR,
    FRAME,
    HALF_CLOSE,
    INIT,
    MALFORMED,
    MESSAGE,
    NOTE,
    PING,
    PONG,
    START,
    Link,
    Settings,
)

__all__ = ["main"]

_SLOT_ROUND = 1 << 20  # slots grow in whole MiB (powers of two below), so frames of varying size reuse them
_WAIT = 0.1  # seconds between looks at a cancelled stream while waiting for a free slot
# With none of its own slots to wait for, how long a receiver waits for /dev/shm to make
# room (other receivers of the loader giving theirs back) before failing the stream.
_SHM_WAIT = 10.0


class _Cancelled(Exception):
    pass


class _NoSlot(Exception):
    """/dev/shm cannot hold the frame, even with every other slot given back."""


class _Slots:
    """Owner of this process's slots: one per frame until the loader releases it."""

    def __init__(self, max_slots: int, note: Callable[[str], None]) -> None:
        self._note = note
        self._short = False  # /dev/shm found full once (said once)
        self._full_since: float | None = None  # waiting for room, holding no slot of its own
        self._arena = shm.Arena()
        self._max = max_slots
        self._free: list[shm.Segment] = []
        self._used: dict[tuple[int, int], shm.Segment] = {}  # (stream, frame's first batch)
        self._cond = threading.Condition()

    def acquire(self, stream: int, index: int, size: int, cancelled: threading.Event) -> shm.Segment:
        """A slot of at least ``size`` bytes for a frame: a free one that fits, a new one
        while under ``max_slots`` and /dev/shm has room, else the first one the loader gives
        back. So a small /dev/shm means fewer frames in flight, not a failed stream; only a
        frame larger than all of it fails (:class:`_NoSlot`)."""
        key = (stream, index)
        with self._cond:
            if key in self._used:
                raise ValueError(f"batch {index} sent twice")
            while True:
                fit = min((s for s in self._free if s.size >= size), key=lambda s: s.size, default=None)
                if fit is not None:
                    self._free.remove(fit)
                    break
                if self._free and len(self._free) + len(self._used) >= self._max:
                    self._drop_smallest_free()  # too small: make room for one that fits
                if len(self._free) + len(self._used) < self._max:
                    fit = self._create(size)
                    if fit is not None:
                        break
                if cancelled.is_set():
                    raise _Cancelled
                self._cond.wait(_WAIT)
            self._used[key] = fit
            return fit

    def _create(self, size: int) -> shm.Segment | None:
        """A new slot, or None when /dev/shm is full for now: slots in use here, or other
        receivers', will come back. _NoSlot when they cannot make room for this frame."""
        while True:
            for nbytes in (_slot_size(size), max(size, 1)):  # rounded up, then exactly
                try:
                    seg = self._arena.create(nbytes)
                    self._full_since = None
                    return seg
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise _NoSlot(str(exc)) from exc
            if not self._free:
                break
            self._drop_smallest_free()  # none fits: their room may let one that fits exist
        capacity = shm.capacity()
        if size > capacity:
            raise _NoSlot(f"a frame of {size} bytes, /dev/shm holds {capacity} in all")
        if not self._short:
            self._short = True
            mib = capacity >> 20
            self._note(
                f"/dev/shm ({mib} MiB) is full: this receiver holds {len(self._used)} frames of {size} "
                "bytes, so fewer travel at once (a container needs a larger --shm-size, or "
                "receive_processes=False)"
            )
        if not self._used:  # only other receivers' slots (or other programs) can make room
            now = time.monotonic()
            self._full_since = self._full_since or now
            if now - self._full_since >= _SHM_WAIT:
                raise _NoSlot(
                    f"/dev/shm ({capacity} bytes) stayed full for {_SHM_WAIT:.0f}s; a frame of {size}"
                )
        return None

    def _drop_smallest_free(self) -> None:
        self._free.remove(small := min(self._free, key=lambda s: s.size))
        small.close()

    def release(self, stream: int, index: int) -> None:
        with self._cond:
            seg = self._used.pop((stream, index), None)
            if seg is not None:
                if _room() < seg.size:  # /dev/shm is tight: give the room back, for any receiver
                    seg.close()
                else:
                    self._free.append(seg)
                self._cond.notify_all()

    def detach(self, stream: int, index: int) -> None:
        """The loader keeps the frame's memory: the slot leaves the pool (its mapping there
        keeps the memory alive until the loader drops it)."""
        with self._cond:
            seg = self._used.pop((stream, index), None)
            if seg is not None:
                seg.close()
                self._cond.notify_all()

    def reclaim(self, stream: int) -> None:
        """The loader is done with ``stream``: nothing there views its slots any more."""
        with self._cond:
            for key in [k for k in self._used if k[0] == stream]:
                self._free.append(self._used.pop(key))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            for seg in [*self._free, *self._used.values()]:
                seg.close()
            self._free.clear()
            self._used.clear()
        self._arena.close()


def _room() -> int:
    """Bytes /dev/shm has free."""
    stat = os.statvfs(shm.SHM_DIR)
    return stat.f_bavail * stat.f_frsize


def _slot_size(size: int) -> int:
    if size <= _SLOT_ROUND:
        return max(4096, 1 << (size - 1).bit_length())
    return -(-size // _SLOT_ROUND) * _SLOT_ROUND


@dataclass
class _Stream:
    number: int
    requests: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    codec: int = _pb2.CODEC_NONE
    call: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    thread: threading.Thread | None = None


class _Receiver:
    def __init__(self, link: Link, settings: Settings) -> None:
        self._link = link
        security = settings.security()
        self._metadata = security.metadata
        self._channel = security.channel(settings.target)
        self._slots = _Slots(settings.max_slots, lambda text: self._send(NOTE, 0, text.encode()))
        self._streams: dict[int, _Stream] = {}
        self._lock = threading.Lock()

    def run(self) -> None:
        """Serve the loader's messages until its socket closes."""
        while (message := self._link.recv()) is not None:
            kind, number, body = message
            if kind == START:
                self._start(number)
                continue
            if kind == PING:
                self._send(PONG, number, b"")
                continue
            stream = self._streams.get(number)
            if stream is None:
                continue  # a stream already reclaimed: its late messages mean nothing now
            if kind == MESSAGE:
                self._forward(stream, body)
            elif kind == HALF_CLOSE:
                stream.requests.put(None)
            elif kind == CANCEL:
                self._cancel(stream)

    def _start(self, number: int) -> None:
        stream = self._streams[number] = _Stream(number)
        stream.thread = threading.Thread(
            target=self._pump, args=(stream,), name=f"receive-{number}", daemon=True
        )
        stream.thread.start()

    def _forward(self, stream: _Stream, raw: bytes) -> None:
        """Releases and detaches are for this process's slots; the rest goes to the server."""
        try:
            msg = wire.parse(_pb2.ClientMessage, raw)
        except ValueError:
            stream.requests.put(raw)  # the server names what is wrong with it
            return
        kind = msg.WhichOneof("kind")
        if kind == "release":
            self._slots.release(stream.number, msg.release.index)
        elif kind == "detach":
            self._slots.detach(stream.number, msg.detach.index)
        else:
            if kind == "open":
                stream.codec = msg.open.compression
            stream.requests.put(raw)

    def _cancel(self, stream: _Stream) -> None:
        with self._lock:
            stream.cancelled.set()
            stream.requests.put(None)
            if stream.call is not None:
                stream.call.cancel()
            done = stream.finished
        if done:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        self._slots.reclaim(stream.number)
        self._streams.pop(stream.number, None)

    def _pump(self, stream: _Stream) -> None:
        """One StreamBatches call: frames on to the loader, payloads into slots."""
        number = stream.number
        try:
            call = self._channel.stream_stream(
                wire.STREAM_BATCHES, request_serializer=None, response_deserializer=None
            )(iter(stream.requests.get, None), wait_for_ready=True, metadata=self._metadata)
            with self._lock:
                stream.call = call
                if stream.cancelled.is_set():
                    call.cancel()
            responses = iter(call)
            for raw in responses:
                frame = wire.parse(_pb2.ServerFrame, raw)
                # A batch's payload goes into a slot; an error frame (no payload) goes on as it is.
                batch = frame.WhichOneof("kind") == "batch" and not frame.batch.HasField("error")
                self._link.send(FRAME, number, self._into_slot(stream, frame, responses) if batch else raw)
            self._link.send(DONE, number)
        except grpc.RpcError as exc:
            self._report(number, exc)
        except (ValueError, StopIteration) as exc:
            if stream.call is not None:
                stream.call.cancel()
            self._send(MALFORMED, number, f"malformed stream from server: {exc}".encode())
        except _Cancelled:
            pass
        except _NoSlot as exc:
            self._fail(stream, "RESOURCE_EXHAUSTED", f"receiver process: no shared memory for a slot ({exc})")
        except OSError:
            pass  # the loader's socket is gone: run() ends and closes everything
        except Exception as exc:  # anything else still reaches the loop, never a silent stall
            self._fail(stream, "INTERNAL", f"receiver process: {type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                stream.finished = True
                cancelled = stream.cancelled.is_set()
            if cancelled:
                self._forget(stream)

    def _into_slot(self, stream: _Stream, frame: _pb2.ServerFrame, responses: Any) -> bytes:
        header = frame.batch
        if header.slot:
            raise ValueError("server sent a shared-memory slot on a byte stream")
        size = wire.stream_payload_bytes(header)
        seg = self._slots.acquire(stream.number, header.index, size, stream.cancelled)
        try:
            wire.read_payload(header, responses, seg.array(size), stream.codec)
        except BaseException:
            self._slots.detach(stream.number, header.index)  # not pooled: it may be far too large
            raise
        header.slot = seg.name
        header.num_chunks = 0
        header.codec = _pb2.CODEC_NONE
        return frame.SerializeToString()

    def _fail(self, stream: _Stream, code: str, details: str) -> None:
        if stream.call is not None:
            stream.call.cancel()
        self._send(ERROR, stream.number, json.dumps({"code": code, "details": details}).encode())

    def _report(self, number: int, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        status = {
            "code": code.name,
            "details": exc.details() if hasattr(exc, "details") else str(exc),
            "trailing": [[k, v] for k, v in trailing or () if isinstance(v, str)],
        }
        self._send(ERROR, number, json.dumps(status).encode())

    def _send(self, kind: bytes, number: int, body: bytes) -> None:
        with contextlib.suppress(OSError):  # the loader is gone; run() ends at once
            self._link.send(kind, number, body)

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.cancelled.set()
            stream.requests.put(None)
            if stream.call is not None:
                stream.call.cancel()
        for stream in list(self._streams.values()):
            if stream.thread is not None:
                stream.thread.join(timeout=5)
        self._channel.close()
        self._slots.close()


def main(argv: list[str]) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the loader decides, and this
    # process ends when the loader's socket does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = Link(socket.socket(fileno=int(argv[0])))
    first = link.recv()
    if first is None or first[0] != INIT:
        return 1
    receiver = _Receiver(link, Settings.from_json(first[2]))
    try:
        receiver.run()
    finally:
        receiver.close()
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
