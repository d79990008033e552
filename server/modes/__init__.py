"""One sender per job mode: ``ordered`` (independent and sharded), ``shared``, ``dynamic``;
``sampled`` for independent streams whose batches the client chooses; ``iterable`` for
IterableDatasets (independent and sharded)."""

from __future__ import annotations

from batchferry.server.plan import Plan
from batchferry.server.stream import Sender
from batchferry.v1 import loader_pb2 as _pb2

from . import dynamic, iterable, ordered, sampled, shared

__all__ = ["SENDERS", "sender_for"]

SENDERS: dict[int, Sender] = {
    _pb2.MODE_INDEPENDENT: ordered.send,
    _pb2.MODE_SHARDED: ordered.send,
    _pb2.MODE_SHARED: shared.send,
    _pb2.MODE_DYNAMIC: dynamic.send,
}


def sender_for(plan: Plan) -> Sender:
    if plan.iterable:
        return iterable.send  # plan() refuses dynamic mode for an IterableDataset
    return sampled.send if plan.client_batches else SENDERS[plan.mode]
