"""The server's shared-memory slots as this client maps them (same-host transport).

Owner: one DataLoader. Segments are attached on first use and kept (the server
reuses a fixed set of slots), each under a shared ``flock`` that tells the server
the memory is mapped here. With CUDA each mapping is page-locked in place once
(``cudaHostRegister``) so device copies read it directly, as from a pinned buffer.
Segments the server replaced are dropped (:meth:`SegmentCache.prune`); batches
still viewing one keep its mapping until they are gone.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from batchferry import shm

__all__ = ["SegmentCache", "probe"]

log = logging.getLogger("batchferry.client")

_MAX_SEGMENTS = 256  # far above any ring; old slots drop out as the server regrows them
_PRUNE_EVERY = 0.2  # seconds between looks for slots the server replaced


def probe(name: str, token: bytes) -> bool:
    """True when the server's probe segment is visible here with the expected token."""
    if not name or "/" in name or not token:
        return False
    try:
        with (shm.SHM_DIR / Path(name).name).open("rb") as f:
            return f.read(len(token)) == token
    except OSError:
        return False


class _Mapped(shm.Mappings):
    def __init__(self, register_with_cuda: bool) -> None:
        super().__init__(_MAX_SEGMENTS, shared_lock=True)
        self.register = register_with_cuda
        self.registered: set[str] = set()

    def on_drop(self, seg: shm.Segment) -> None:
        if seg.name in self.registered:
            # Device copies from it have completed (slots are released only after
            # their events), so the registration can go.
            self.registered.discard(seg.name)
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(seg.address())


class SegmentCache:
    def __init__(self, register_with_cuda: bool) -> None:
        self._mapped = _Mapped(register_with_cuda and torch.cuda.is_available())
        self._lock = threading.Lock()
        self._pruned = time.monotonic()

    def reserve(self, segments: int) -> None:
        """Keep at least ``segments`` mapped (receiver processes add their slots to the
        server's): a slot evicted while in use would be mapped, and registered, again."""
        with self._lock:
            self._mapped.max_segments = max(self._mapped.max_segments, segments)

    def is_registered(self, name: str) -> bool:
        """Whether the segment is page-locked for CUDA (else copies go through pinned buffers)."""
        return name in self._mapped.registered

    def map(self, name: str) -> np.ndarray:
        """A uint8 array over the whole mapped segment (it keeps the mapping alive, even
        once the segment leaves this cache); ``OSError`` when it cannot be opened."""
        with self._lock:
            return self._get(name).array()

    def _get(self, name: str) -> shm.Segment:
        seg, new = self._mapped.get(name)
        if new and self._mapped.register and seg.size:
            err = torch.cuda.cudart().cudaHostRegister(seg.address(), seg.size, 0)
            if int(err) == 0:
                self._mapped.registered.add(name)
            else:
                torch.cuda.cudart().cudaGetLastError()  # clear it; copies go through pinned buffers
                log.warning("cudaHostRegister of %s failed (CUDA error %d)", name, int(err))
        return seg

    def forget(self, name: str) -> None:
        """Stop caching a segment; batches viewing it keep it mapped."""
        with self._lock:
            self._mapped.forget(name)

    def prune(self) -> None:
        """Drop segments the server replaced (at most every few hundred ms)."""
        if time.monotonic() - self._pruned < _PRUNE_EVERY:
            return
        with self._lock:
            self._pruned = time.monotonic()
            self._mapped.prune()

    def close(self) -> None:
        with self._lock:
            self._mapped.close()
