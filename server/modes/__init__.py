"""One sender per job mode: ``ordered`` (independent and sharded), ``shared``, ``dynamic``;
and ``sampled`` for independent streams whose batches the client chooses."""

from __future__ import annotations

from batchferry.server.plan import Plan
from batchferry.server.stream import Sender
from batchferry.v1 import loader_pb2 as _pb2

from . import dynamic, ordered, sampled, shared

__all__ = ["SENDERS", "sender_for"]

SENDERS: dict[int, Sender] = {
    _pb2.MODE_INDEPENDENT: ordered.send,
    _pb2.MODE_SHARDED: ordered.send,
    _pb2.MODE_SHARED: shared.send,
    _pb2.MODE_DYNAMIC: dynamic.send,
}


def sender_for(plan: Plan) -> Sender:
    return sampled.send if plan.client_batches else SENDERS[plan.mode]
