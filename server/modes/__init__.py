"""One sender per job mode: ``ordered`` (independent and sharded), ``shared``, ``dynamic``."""

from __future__ import annotations

from batchferry.server.stream import Sender
from batchferry.v1 import loader_pb2 as _pb2

from . import dynamic, ordered, shared

__all__ = ["SENDERS"]

SENDERS: dict[int, Sender] = {
    _pb2.MODE_INDEPENDENT: ordered.send,
    _pb2.MODE_SHARDED: ordered.send,
    _pb2.MODE_SHARED: shared.send,
    _pb2.MODE_DYNAMIC: dynamic.send,
}
