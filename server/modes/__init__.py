"""One sender per job mode: ``ordered`` (independent and sharded), ``shared``, ``dynamic``;
``sampled`` for independent streams whose batches the client chooses; ``iterable`` for
IterableDatasets (independent and sharded), ``iterable_shared`` for them in shared mode."""

from __future__ import annotations

from batchferry.server.plan import Plan
from batchferry.server.stream import Sender
from batchferry.v1 import loader_pb2 as _pb2

from . import dynamic, iterable, iterable_shared, ordered, sampled, shared

__all__ = ["SENDERS", "sender_for"]

SENDERS: dict[int, Sender] = {
    _pb2.MODE_INDEPENDENT: ordered.send,
    _pb2.MODE_SHARDED: ordered.send,
    _pb2.MODE_SHARED: shared.send,
    _pb2.MODE_DYNAMIC: dynamic.send,
}


def sender_for(plan: Plan) -> Sender:
    if plan.iterable:  # plan() refuses dynamic mode for an IterableDataset
        return iterable_shared.send if plan.mode == _pb2.MODE_SHARED else iterable.send
    return sampled.send if plan.client_batches else SENDERS[plan.mode]
