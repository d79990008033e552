"""The server's shared-memory slots as this client maps them (same-host transport).

Owner: one DataLoader. Segments are attached on first use and kept (the server
reuses a fixed set of slots); with CUDA each mapping is page-locked in place once
(``cudaHostRegister``) so device copies read it directly, as from a pinned buffer.
Mappings are never unmapped here while batches may view them: dropping a segment
drops this cache's reference, and the mapping goes with the last tensor using it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from batchferry import shm

__all__ = ["SegmentCache", "probe"]

log = logging.getLogger("batchferry.client")

_MAX_SEGMENTS = 128  # far above any ring; old slots drop out as the server regrows them


def probe(name: str, token: bytes) -> bool:
    """True when the server's probe segment is visible here with the expected token."""
    if not name or "/" in name or not token:
        return False
    try:
        with (shm.SHM_DIR / Path(name).name).open("rb") as f:
            return f.read(len(token)) == token
    except OSError:
        return False


class SegmentCache:
    def __init__(self, register_with_cuda: bool) -> None:
        self._register = register_with_cuda and torch.cuda.is_available()
        self._segments: OrderedDict[str, shm.Segment] = OrderedDict()
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    def is_registered(self, name: str) -> bool:
        """Whether the segment is page-locked for CUDA (else copies go through pinned buffers)."""
        return name in self._registered

    def get(self, name: str) -> shm.Segment:
        """The mapped segment; ``OSError`` when it cannot be opened."""
        if not name.startswith(shm.PREFIX) or "/" in name:
            raise ValueError(f"server named an invalid slot {name!r}")
        with self._lock:
            seg = self._segments.get(name)
            if seg is not None:
                self._segments.move_to_end(name)
                return seg
            seg = shm.Segment.attach(name)
            if self._register and seg.size:
                err = torch.cuda.cudart().cudaHostRegister(seg.tensor.data_ptr(), seg.size, 0)
                if int(err) == 0:
                    self._registered.add(name)
                else:
                    torch.cuda.cudart().cudaGetLastError()  # clear it; copies go through pinned buffers
                    log.warning("cudaHostRegister of %s failed (CUDA error %d)", name, int(err))
            self._segments[name] = seg
            while len(self._segments) > _MAX_SEGMENTS:
                self._drop(self._segments.popitem(last=False)[1])
            return seg

    def forget(self, name: str) -> None:
        """Stop caching a segment the server detached; batches viewing it keep it mapped."""
        with self._lock:
            seg = self._segments.pop(name, None)
            if seg is not None:
                self._drop(seg)

    def _drop(self, seg: shm.Segment) -> None:
        if seg.name in self._registered:
            # Device copies from it have completed (slots are released only after
            # their events), so the registration can go.
            self._registered.discard(seg.name)
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(seg.tensor.data_ptr())
        seg.close(unmap=False)

    def close(self) -> None:
        with self._lock:
            while self._segments:
                self._drop(self._segments.popitem()[1])
