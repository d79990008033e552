"""Epoch orders, made once and shared by every stream that reads the same one, within a budget.

An order costs one permutation of the dataset at most (4 bytes a sample, 8 beyond
2**31 samples; nothing without shuffling). Streams of one job epoch share its
permutation (every rank of a sharded job reads the same one with its own offset),
and a client that reconnects finds its own again. Permutations no stream holds are
kept for reuse while they fit. Together they never exceed ``max_bytes``: a stream
whose order would not fit after dropping unused ones is refused with
RESOURCE_EXHAUSTED naming the budget (``--max-index-bytes``).

Lock order: ``Orders._lock`` is a leaf.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import torch

from batchferry import sampling
from batchferry.v1 import loader_pb2 as _pb2

from .plan import Plan
from .status import Abort

__all__ = ["Orders"]

_Key = tuple[object, ...]


@dataclass(eq=False)
class _Permutation:
    base: torch.Tensor
    states: tuple[bytes, bytes] = (b"", b"")  # independent: generator states after order and epoch
    holders: set[int] = field(default_factory=set)


class Orders:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._kept: OrderedDict[_Key, _Permutation] = OrderedDict()
        self._held: dict[int, _Key] = {}  # id(order) -> its permutation's key

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.base.nbytes for p in self._kept.values())

    def open(self, plan: Plan) -> sampling.EpochOrder:
        """The order ``plan`` reads; hold it until :meth:`close`."""
        if not plan.shuffle and not plan.consumed:
            return self._shape(plan, None)
        if plan.mode == _pb2.MODE_INDEPENDENT:
            key: _Key = ("state", plan.length, plan.sampler_state)
        elif plan.consumed:  # the rest of a resized epoch: every rank of the new world shares it
            digest = hashlib.sha256(plan.consumed).digest()
            key = ("rest", plan.length, plan.seed + plan.epoch if plan.shuffle else None, digest)
        else:
            key = ("seed", plan.length, plan.seed + plan.epoch)
        with self._lock:
            perm = self._kept.get(key)
            if perm is None:
                perm = self._kept[key] = self._make(key, plan)
            self._kept.move_to_end(key)
            order = self._shape(plan, perm)
            perm.holders.add(id(order))
            self._held[id(order)] = key
            return order

    def close(self, order: sampling.EpochOrder) -> None:
        with self._lock:
            key = self._held.pop(id(order), None)
            perm = self._kept.get(key) if key is not None else None
            if perm is not None:
                perm.holders.discard(id(order))

    def _make(self, key: _Key, plan: Plan) -> _Permutation:
        need = plan.length * (4 if plan.length <= torch.iinfo(torch.int32).max else 8)
        for unused in [k for k, p in self._kept.items() if not p.holders]:  # oldest first
            if sum(p.base.nbytes for p in self._kept.values()) + need <= self.max_bytes:
                break
            del self._kept[unused]
        held = sum(p.base.nbytes for p in self._kept.values())
        if held + need > self.max_bytes:
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the order of this epoch takes {need} bytes, and streams hold {held} bytes of orders: "
                f"above the server's max_index_bytes={self.max_bytes}",
            )
        if key[0] == "state":
            order = sampling.epoch_order(plan.length, True, plan.sampler_state)
            assert order.base is not None
            return _Permutation(order.base, (order.state_after_order, order.state_after_epoch))
        if key[0] == "rest":
            return _Permutation(
                sampling.rest_order(plan.length, plan.shuffle, plan.seed, plan.epoch, plan.consumed)
            )
        base = sampling.seeded_order(plan.length, True, plan.seed, plan.epoch)
        assert base is not None
        return _Permutation(base)

    @staticmethod
    def _shape(plan: Plan, perm: _Permutation | None) -> sampling.EpochOrder:
        base = perm.base if perm is not None else None
        if plan.mode == _pb2.MODE_SHARDED:
            # A resized epoch's base is already the rest of its order (see _make).
            return sampling.sharded_order(
                plan.length, plan.shuffle, plan.seed, plan.epoch, plan.rank, plan.world_size,
                plan.drop_last, base=base, consumed=plan.consumed,
            )  # fmt: skip
        after_order, after_epoch = perm.states if perm is not None else (b"", b"")
        return sampling.EpochOrder(
            plan.length, plan.length, base, state_after_order=after_order, state_after_epoch=after_epoch
        )
