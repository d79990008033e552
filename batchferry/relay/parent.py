"""ReceiverProcess processes: byte streams received outside the loader's interpreter.

Owner: one DataLoader (``receive_processes=True``) owns a :class:`ReceiverProcesses`, one
process per byte stream it opens at once (per replica and stripe), kept across
epochs so their slots stay mapped (and page-locked for CUDA) here. Each process
(:mod:`batchferry.relay.child`) runs the StreamBatches call and writes payloads into
shared-memory slots of its own; :class:`RelayedCall` gives :class:`EpochStream`
what it uses of a gRPC call (the responses, ``cancel()``), now with frames that name
those slots, so the stream takes its same-host path: zero-copy views, releases.

A receiver that dies (kill -9, OOM) fails its stream as UNAVAILABLE: the loader
reconnects as after a cut link, and a fresh process takes the stream over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grpc

from batchferry import shm
from batchferry.errors import InvalidArgument
from batchferry.security import ClientSecurity

from . import link as _r

__all__ = ["ReceiverProcess", "ReceiverProcesses", "RelayedCall"]

log = logging.getLogger("batchferry.client")

_DONE = object()
_STOP_WAIT = 5.0  # seconds the receivers get, together, to end once their sockets close
# A receiver reads what the loader sends at once; one that has not for this long is stuck
# (stopped, swapped out): it is killed and replaced.
_SEND_TIMEOUT = 10.0
_ALL: weakref.WeakSet[ReceiverProcess] = weakref.WeakSet()  # for the fork hook below


class _StatusError(grpc.RpcError):  # type: ignore[misc]  # grpc has no type hints
    """A status the receiver process got (or a loss of it), as the call would raise it."""

    def __init__(
        self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


class RelayedCall:
    """One stream through a receiver: iterate for the server's frames; ``cancel()`` when done."""

    def __init__(self, receiver: ReceiverProcess, number: int) -> None:
        self._receiver = receiver
        self.number = number
        self._frames: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancelled = False
        self._lock = threading.Lock()
        self._written = False  # every message the loader queued has gone to the receiver

    def start(self, requests: Iterator[bytes]) -> None:
        """Send the loader's messages on (after the receiver knows the stream)."""
        threading.Thread(
            target=self._write, args=(requests,), name="batchferry-relay-writer", daemon=True
        ).start()

    def _write(self, requests: Iterator[bytes]) -> None:
        try:
            for raw in requests:
                self._receiver.send(_r.MESSAGE, self.number, raw)
            self._receiver.send(_r.HALF_CLOSE, self.number)
            with self._lock:
                self._written = True
                cancelled = self._cancelled
            if cancelled:
                self._receiver.send(_r.CANCEL, self.number)
        except OSError:
            pass  # the receiver is gone: the frames' side reports it

    def deliver(self, item: Any) -> None:
        self._frames.put(item)

    def __iter__(self) -> RelayedCall:
        return self

    def __next__(self) -> bytes:
        if self._cancelled:
            raise _StatusError(grpc.StatusCode.CANCELLED, "stream closed by the loader")
        item = self._frames.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]

    def cancel(self) -> None:
        """The loader is done with this stream (ended or not): the receiver may reuse its slots."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            written = self._written
        self._frames.put(_StatusError(grpc.StatusCode.CANCELLED, "stream closed by the loader"))
        # After the releases and detaches still queued (else the receiver could reuse a slot the
        # loader keeps): by the writer once it has sent them, else now.
        if written:
            with contextlib.suppress(OSError):
                self._receiver.send(_r.CANCEL, self.number)
        self._receiver.forget(self.number)


class ReceiverProcess:
    """One receiver process and its socket."""

    def __init__(self, settings: _r.Settings) -> None:
        self.target = settings.target
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # Find batchferry where this process found it (a checkout, a virtualenv).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "batchferry.relay.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a terminal's Ctrl-C goes to the loader, which decides
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._link = _r.Link(ours)
        _ALL.add(self)
        self._calls: dict[int, RelayedCall] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._gone = False
        self._pongs: dict[int, threading.Event] = {}
        self.send(_r.INIT, 0, settings.to_json())
        self._reader = threading.Thread(target=self._read, name="batchferry-relay-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return not self._gone and self._proc.poll() is None

    def open(self, requests: Iterator[bytes]) -> RelayedCall:
        with self._lock:
            self._next += 1
            call = self._calls[self._next] = RelayedCall(self, self._next)
        try:
            self.send(_r.START, call.number)
        except OSError:
            call.deliver(self._lost())
        call.start(requests)
        return call

    def send(self, kind: bytes, number: int, body: bytes = b"") -> None:
        """OSError when the receiver is gone, or stuck: then it is killed (and replaced by
        the next open), so its streams fail as UNAVAILABLE and reconnect."""
        try:
            self._link.send(kind, number, body, timeout=_SEND_TIMEOUT)
        except TimeoutError:
            self.kill()
            raise

    def responsive(self, timeout: float) -> bool:
        """Whether the receiver answers a ping within ``timeout`` seconds (a stopped or
        stuck one does not; its stream's silence is then its own, not the server's)."""
        with self._lock:
            self._next += 1
            number, answered = self._next, threading.Event()
            self._pongs[number] = answered
        try:
            self._link.send(_r.PING, number, timeout=timeout)
            return answered.wait(timeout)
        except OSError:
            return False
        finally:
            with self._lock:
                self._pongs.pop(number, None)

    def kill(self) -> None:
        """End a stuck receiver now (its reaper removes its slots)."""
        self._gone = True
        with contextlib.suppress(OSError):
            self._proc.kill()

    def forget(self, number: int) -> None:
        with self._lock:
            self._calls.pop(number, None)

    def _read(self) -> None:
        while (message := self._link.recv()) is not None:
            kind, number, body = message
            if kind == _r.NOTE:
                log.warning("receiver process %d: %s", self._proc.pid, body.decode(errors="replace"))
                continue
            if kind == _r.PONG:
                with self._lock:
                    pong = self._pongs.get(number)
                if pong is not None:
                    pong.set()
                continue
            with self._lock:
                call = self._calls.get(number)
            if call is None:
                continue  # a stream the loader closed: what was still coming means nothing
            if kind == _r.FRAME:
                call.deliver(body)
            elif kind == _r.DONE:
                call.deliver(_DONE)
            elif kind == _r.ERROR:
                call.deliver(_status(body))
            elif kind == _r.MALFORMED:
                call.deliver(ValueError(body.decode(errors="replace")))
        self._gone = True
        with self._lock:
            calls, self._calls = list(self._calls.values()), {}
        for call in calls:
            call.deliver(self._lost())

    def _lost(self) -> _StatusError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=0.5)
        how = "is gone" if self._proc.returncode is None else f"ended (exit status {self._proc.returncode})"
        return _StatusError(grpc.StatusCode.UNAVAILABLE, f"receiver process {self._proc.pid} {how}")

    def hang_up(self) -> None:
        """Close the socket: the process ends once it sees that (:meth:`close` waits for it)."""
        self._link.close()

    def forget_after_fork(self) -> None:
        """In a forked child: drop this process's copy of the socket without closing it."""
        self._link.detach()

    def close(self, deadline: float | None = None) -> None:
        """End the process (it unlinks its slots; mappings here stay valid while viewed):
        closing its socket ends it; one still running at ``deadline`` is killed."""
        self.hang_up()
        if deadline is None:
            deadline = time.monotonic() + _STOP_WAIT
        try:
            self._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=max(0.1, deadline - time.monotonic()))


def _drop_links() -> None:
    # A process forked from the loader must not hold the receivers' sockets open: they would
    # outlive a loader killed outright.
    for receiver in list(_ALL):
        receiver.forget_after_fork()


os.register_at_fork(after_in_child=_drop_links)


def _status(body: bytes) -> BaseException:
    try:
        status = json.loads(body)
        code = grpc.StatusCode[status["code"]]
        trailing = tuple((str(k), str(v)) for k, v in status.get("trailing", ()))
        return _StatusError(code, str(status["details"]), trailing)
    except (ValueError, KeyError, TypeError):
        return ValueError("receiver process sent a malformed status")


class ReceiverProcesses:
    """A loader's receiver processes, one per concurrent byte stream, made on first use."""

    def __init__(self, security: ClientSecurity) -> None:
        if security.credentials is not None:
            raise InvalidArgument(
                "receive_processes=True cannot hand a grpc.ChannelCredentials object to its processes: "
                "give root_certificates/client_cert/client_key (bytes or paths) instead"
            )
        self._security = security
        self._receivers: dict[int, ReceiverProcess] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, stream: int, target: str, max_slots: int) -> ReceiverProcess:
        """The receiver for the loader's ``stream``-th stream to ``target`` (a fresh one if
        the last died or served another target)."""
        with self._lock:
            if self._closed:
                raise InvalidArgument("the DataLoader is closed")
            current = self._receivers.get(stream)
            if current is not None and current.alive() and current.target == target:
                return current
            if current is not None:
                dead = not current.alive()
                current.close()
                if dead:  # one killed while starting may have left its owner file behind
                    shm.remove_stale()
            self._receivers[stream] = ReceiverProcess(_r.Settings.of(target, max_slots, self._security))
            return self._receivers[stream]

    def current(self, stream: int) -> ReceiverProcess | None:
        with self._lock:
            return self._receivers.get(stream)

    def pids(self) -> list[int]:
        with self._lock:
            return [r.pid for r in self._receivers.values() if r.alive()]

    def close(self) -> None:
        """End every receiver: all are told at once, then waited for together (bounded)."""
        with self._lock:
            self._closed = True
            receivers, self._receivers = list(self._receivers.values()), {}
        deadline = time.monotonic() + _STOP_WAIT
        for receiver in receivers:
            receiver.hang_up()
        for receiver in receivers:
            receiver.close(deadline)
