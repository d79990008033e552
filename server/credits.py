"""Credit flow control and slot releases: what a client sends after its open message.

:class:`ClientMessages` reads the client's messages on its own thread. Credits say
how many batches the server may have sent; a sender blocks in :meth:`wait_for`
until it may send the next. On the same-host transport the client also releases
the slot of each batch it has read (or detaches one it keeps). The slot of a sent
batch is *held* here, through its :class:`Held` handle, until then; whatever is
still held when the stream ends is abandoned (the client may still map it, so it
is never reused).

Lock order: ``ClientMessages._cond`` is taken alone; handles are called after it
is released.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from batchferry import wire
from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["MAX_PENDING_SAMPLES", "ClientMessages", "Held"]

_WAIT = 0.2  # seconds between looks at the call's liveness while blocked
_MAX_CREDIT = 1 << 20  # batch frames one credit message may grant
_OPEN_S = 10.0  # a client sends its open message at once: a stream that does not is refused
MAX_PENDING_SAMPLES = 1 << 22  # sample indices a client may send ahead of its stream's need


class Held(Protocol):
    """What a client holds while it maps a batch's slot."""

    def release(self) -> None: ...
    def detach(self) -> None: ...
    def abandon(self) -> None: ...


class ClientMessages:
    """The client's side of one stream: its open message, then credits and releases.

    ``idle_s``: a client that sends nothing for this long while the stream waits on
    it (no open message yet, or no credit) is taken for gone (:attr:`idle`).
    """

    def __init__(self, requests: Iterator[bytes], idle_s: float, open_s: float | None = None) -> None:
        self._requests = requests
        self._idle_s = idle_s
        self._open_s = min(idle_s, _OPEN_S) if open_s is None else open_s
        self._heard = time.monotonic()
        self.idle = False
        self._open: _pb2.OpenStream | None = None
        # Called with the batches taken so far whenever a credit arrives (on the reader thread).
        self.on_credit: list[Callable[[int], None]] = []
        self._cond = threading.Condition()
        self.granted = 0  # batch frames the server may have sent
        # Batches in each frame sent, oldest first, until the client credits it back: a
        # credit frees a frame, and this turns frames taken into batches taken.
        self._frames: deque[int] = deque()
        self._ahead = 0  # frames credited before they were sent
        self.taken = 0  # batches the client has consumed
        self._held: dict[int, Held] = {}
        self._lists: list[_pb2.BatchIndices] = []  # client_batches: sent, not yet taken
        self._pending_samples = 0
        self.error: str | None = None
        self.stopped = False  # the client wants no more batches (then an end frame)
        self.cancelled = False  # the client cancelled the call, or its process or link died
        self.ended = False  # the client half-closed, cancelled or went away
        self._thread = threading.Thread(target=self._run, name="batchferry-client-messages", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in self._requests:
                self._heard = time.monotonic()
                msg = wire.parse(_pb2.ClientMessage, raw)
                kind = msg.WhichOneof("kind")
                if self._open is None:
                    if kind != "open":
                        raise ValueError("the first message of a stream must be 'open'")
                    with self._cond:
                        self._open = msg.open
                        self._cond.notify_all()
                elif kind == "credit" and 1 <= msg.credit.batches <= _MAX_CREDIT:
                    with self._cond:
                        self.granted += msg.credit.batches
                        frames = msg.credit.batches
                        while frames and self._frames:
                            self.taken += self._frames.popleft()
                            frames -= 1
                        self.taken += frames  # credit ahead of frames sent: a batch each,
                        self._ahead += frames  # the rest counted as those frames go out
                        taken = self.taken
                        self._cond.notify_all()
                    for callback in self.on_credit:
                        callback(taken)
                elif kind == "release":
                    self._take(msg.release.index).release()
                elif kind == "detach":
                    self._take(msg.detach.index).detach()
                elif kind == "stop":
                    with self._cond:
                        self.stopped = True
                        self._cond.notify_all()
                elif kind == "batches":
                    self._add_lists(msg.batches)
                else:
                    raise ValueError(
                        f"after open, the client may only send credit (batches in [1, {_MAX_CREDIT}]), "
                        "release, detach, stop and batches messages"
                    )
        except ValueError as exc:
            self.error = str(exc)
        except Exception:  # the client cancelled the call or went away
            self.cancelled = True
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def _add_lists(self, lists: _pb2.BatchIndices) -> None:
        with self._cond:
            self._pending_samples += len(lists.samples)
            if self._pending_samples > MAX_PENDING_SAMPLES:
                raise ValueError(
                    f"batches: more than {MAX_PENDING_SAMPLES} sample indices sent ahead of need; "
                    "send fewer ahead"
                )
            self._lists.append(lists)
            self._cond.notify_all()

    def take_lists(self) -> list[_pb2.BatchIndices]:
        """The index lists the client sent since the last call (client_batches streams)."""
        with self._cond:
            lists, self._lists = self._lists, []
            self._pending_samples = 0
            return lists

    def wait_lists(self, active: Callable[[], bool]) -> bool:
        """Block until index lists arrive; False when the call is over or the client stopped."""
        with self._cond:
            while not self._lists:
                if not self.open or not active() or self.quiet():
                    return False
                self._cond.wait(_WAIT)
            return True

    def open_message(self) -> _pb2.OpenStream:
        """The stream's open message, waited for up to ``idle_s``; ValueError naming the problem."""
        with self._cond:
            while self._open is None:
                if self.error is not None:
                    raise ValueError(self.error)
                if self.ended:
                    raise ValueError("stream ended before an open message")
                if time.monotonic() - self._heard > self._open_s:
                    self.idle = True
                    raise ValueError(f"no open message within {self._open_s:g}s")
                self._cond.wait(_WAIT)
            return self._open

    def start(self, credits: int) -> None:
        """The open message's credits: batches the server may send before more are granted."""
        with self._cond:
            self.granted += credits
            self._cond.notify_all()

    def sending(self, batches: int) -> None:
        """A frame of ``batches`` batches is about to go out (before the client can credit it)."""
        with self._cond:
            if self._ahead:
                self._ahead -= 1
                self.taken += batches - 1
            else:
                self._frames.append(batches)

    @property
    def held(self) -> int:
        """Slots the client holds now."""
        with self._cond:
            return len(self._held)

    def hold(self, index: int, held: Held) -> None:
        with self._cond:
            self._held[index] = held

    def _take(self, index: int) -> Held:
        with self._cond:
            held = self._held.pop(index, None)
            self._cond.notify_all()
        if held is None:
            raise ValueError(f"release: batch {index} holds no slot")
        return held

    @property
    def open(self) -> bool:
        """The client still wants batches."""
        return self.error is None and not self.ended and not self.stopped and not self.idle

    def wait_for(self, sent: int, active: Callable[[], bool]) -> bool:
        """Block until a send is allowed (granted > sent); False when the call is over
        or the client stopped or half-closed (it wants no more batches)."""
        with self._cond:
            while self.granted <= sent or self.stopped:
                if self.error is not None or self.ended or self.stopped or not active():
                    return False
                if self.quiet():
                    return False
                self._cond.wait(_WAIT)
            return True

    def quiet(self) -> bool:
        """True (and :attr:`idle` set) once the client has said nothing for ``idle_s``."""
        if time.monotonic() - self._heard > self._idle_s:
            self.idle = True
        return self.idle

    def wait_released(self, timeout: float, active: Callable[[], bool]) -> None:
        """Until the client released every slot, half-closed, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._held and not self.ended and active() and time.monotonic() < deadline:
                self._cond.wait(_WAIT)

    def close(self, client_gone: bool = False) -> None:
        """At stream end: what the client never released may still back its batches.

        A client that cancelled (or died) reads no more frames, so it maps no slot it
        has not mapped already: those slots leave the ring at once, and their memory
        counts while it still maps them. Otherwise (the server ended the stream) the
        client may still be reading the frames before the end: the slots keep their
        names for a while (LINGERING), never reused.
        """
        with self._cond:
            held, self._held = list(self._held.values()), {}
        for h in held:
            if self.cancelled or client_gone:
                h.detach()
            else:
                h.abandon()
        # The reader thread ends with the call and owns nothing to wait for.
