"""The socket between a loader and its receiver processes, and what crosses it.

Both sides import this module: :mod:`batchferry.relay.parent` (the loader's handles)
and :mod:`batchferry.relay.child` (the process). Messages are (kind, stream number,
body), length-prefixed::

    loader -> child:  INIT settings (JSON), once | START n | MESSAGE n ClientMessage |
                      HALF_CLOSE n | CANCEL n (the loader is done with stream n) | PING n
    child -> loader:  FRAME n ServerFrame | DONE n | ERROR n status (JSON) |
                      MALFORMED n text (the server's stream was malformed) |
                      NOTE 0 text (for the loader's log) | PONG n (to PING n)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import select
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from batchferry.security import ClientSecurity

__all__ = [
    "CANCEL",
    "DONE",
    "ERROR",
    "FRAME",
    "HALF_CLOSE",
    "INIT",
    "MALFORMED",
    "MESSAGE",
    "NOTE",
    "PING",
    "PONG",
    "START",
    "Link",
    "Settings",
]

INIT, START, MESSAGE, HALF_CLOSE, CANCEL, PING = b"I", b"S", b"M", b"H", b"X", b"?"
FRAME, DONE, ERROR, MALFORMED, NOTE, PONG = b"F", b"D", b"E", b"P", b"N", b"!"

_HEAD = struct.Struct("<IcI")  # body length, kind, stream number
_MAX_BODY = 256 << 20  # far above any header or index list: a larger length is a broken link


class Link:
    """Length-prefixed messages over a stream socket; sending is thread-safe, one reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb", buffering=1 << 16)
        self._lock = threading.Lock()

    def send(self, kind: bytes, stream: int, body: bytes = b"", timeout: float | None = None) -> None:
        """OSError once the other side is gone; TimeoutError (an OSError) when it has not read
        for ``timeout`` seconds (None: wait as long as it takes). After a timeout the link is
        unusable (a message may be cut short)."""
        data = _HEAD.pack(len(body), kind, stream) + body
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"link busy for {timeout}s")
        try:
            if timeout is None:
                self.sock.sendall(data)
                return
            deadline, view = time.monotonic() + timeout, memoryview(data)
            while view:
                left = deadline - time.monotonic()
                fd = self.sock.fileno()
                if fd < 0:
                    raise OSError(errno.EBADF, "link closed")
                poller = select.poll()  # not select(): a loader may hold descriptors past 1024
                poller.register(fd, select.POLLOUT)
                if left <= 0 or not poller.poll(left * 1000):
                    raise TimeoutError(f"the other side has not read for {timeout}s")
                with contextlib.suppress(BlockingIOError):
                    view = view[self.sock.send(view, socket.MSG_DONTWAIT) :]
        finally:
            self._lock.release()

    def recv(self) -> tuple[bytes, int, bytes] | None:
        """The next message, or None once the other side is gone (or sent garbage)."""
        try:
            head = self._reader.read(_HEAD.size)
            if len(head) < _HEAD.size:
                return None
            size, kind, stream = _HEAD.unpack(head)
            if size > _MAX_BODY:
                return None
            body = self._reader.read(size) if size else b""
        except (OSError, ValueError):  # ValueError: read after close
            return None
        return (kind, stream, body) if len(body) == size else None

    def detach(self) -> None:
        """Let go of the socket without closing it for the other side (a forked child's copy)."""
        with contextlib.suppress(OSError):
            os.close(self.sock.detach())  # the fd only: no shutdown, which the parent would see

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked on it
        with contextlib.suppress(OSError):
            self._reader.close()
        self.sock.close()


# The fields Settings shares with ClientSecurity: what crosses to a receiver process.
_SECURITY = ("tls", "root_certificates", "client_cert", "client_key", "token", "server_name")
_PEM = ("root_certificates", "client_cert", "client_key")  # bytes: base64 in JSON


@dataclass(frozen=True)
class Settings:
    """What a receiver needs to reach the server as its loader would."""

    target: str
    max_slots: int
    tls: bool = False
    root_certificates: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    token: str = ""
    server_name: str = ""

    def to_json(self) -> bytes:
        data: dict[str, Any] = asdict(self)
        for key in _PEM:
            if data[key] is not None:
                data[key] = base64.b64encode(data[key]).decode()
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Settings:
        data: dict[str, Any] = json.loads(raw)
        for key in _PEM:
            if data[key] is not None:
                data[key] = base64.b64decode(data[key])
        return cls(**data)

    @classmethod
    def of(cls, target: str, max_slots: int, security: ClientSecurity) -> Settings:
        """A loader's security, as far as another process can take it (not ``credentials``)."""
        return cls(target, max_slots, **{name: getattr(security, name) for name in _SECURITY})

    def security(self) -> ClientSecurity:
        return ClientSecurity(**{name: getattr(self, name) for name in _SECURITY})
