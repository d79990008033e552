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
from collections.abc import Callable, Iterator
from typing import Protocol

from batchferry import wire
from batchferry.v1 import loader_pb2 as _pb2

__all__ = ["ClientMessages", "Held"]

_WAIT = 0.2  # seconds between looks at the call's liveness while blocked


class Held(Protocol):
    """What a client holds while it maps a batch's slot."""

    def release(self) -> None: ...
    def detach(self) -> None: ...
    def abandon(self) -> None: ...


class ClientMessages:
    def __init__(
        self,
        requests: Iterator[bytes],
        initial: int,
        on_credit: Callable[[int], None] | None = None,
    ) -> None:
        self._requests = requests
        self.on_credit = on_credit
        self._cond = threading.Condition()
        self.granted = initial
        self._held: dict[int, Held] = {}
        self.error: str | None = None
        self.stopped = False  # the client wants no more batches (then an end frame)
        self.ended = False  # the client half-closed, cancelled or went away
        self._thread = threading.Thread(target=self._run, name="batchferry-client-messages", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in self._requests:
                msg = wire.parse(_pb2.ClientMessage, raw)
                kind = msg.WhichOneof("kind")
                if kind == "credit" and msg.credit.batches >= 1:
                    with self._cond:
                        self.granted += msg.credit.batches
                        granted = self.granted
                        self._cond.notify_all()
                    if self.on_credit is not None:
                        self.on_credit(granted)
                elif kind == "release":
                    self._take(msg.release.index).release()
                elif kind == "detach":
                    self._take(msg.detach.index).detach()
                elif kind == "stop":
                    with self._cond:
                        self.stopped = True
                        self._cond.notify_all()
                else:
                    raise ValueError(
                        "after open, the client may only send credit (batches >= 1), release, detach "
                        "and stop messages"
                    )
        except ValueError as exc:
            self.error = str(exc)
        except Exception:  # the call was cancelled or the peer went away
            pass
        with self._cond:
            self.ended = True
            self._cond.notify_all()

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
        return self.error is None and not self.ended and not self.stopped

    def wait_for(self, sent: int, active: Callable[[], bool]) -> bool:
        """Block until a send is allowed (granted > sent); False when the call is over
        or the client stopped or half-closed (it wants no more batches)."""
        with self._cond:
            while self.granted <= sent or self.stopped:
                if self.error is not None or self.ended or self.stopped or not active():
                    return False
                self._cond.wait(_WAIT)
            return True

    def wait_released(self, timeout: float, active: Callable[[], bool]) -> None:
        """Until the client released every slot, half-closed, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._held and not self.ended and active() and time.monotonic() < deadline:
                self._cond.wait(_WAIT)

    def close(self) -> None:
        """At stream end: abandon what the client never released; stop reading."""
        with self._cond:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.abandon()
        # The reader thread ends with the call and owns nothing to wait for.
