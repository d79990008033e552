"""A pool of host buffers (pinned when CUDA is present) reused for a loader's life.

Pinning memory costs far more than filling it, so buffers are allocated once and
reused. A buffer is free again only when nothing outside the pool references it
(every batch tensor viewing it has been dropped) *and* the CUDA copy reading it,
if any, has completed. A training loop that drops each batch reuses the same few
buffers forever; a caller that keeps batches keeps their buffers, and the pool
allocates others rather than overwrite data still in use.

Lifetimes are tracked with public mechanisms only: each handed-out buffer is a
tensor made from a fresh numpy view of a pooled buffer, and a weak reference to
that view dies with the last tensor over it. Nothing runs when it dies (code in a
finalizer could swallow a Ctrl-C): the pool looks at the reference when it needs a
buffer.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["BufferPool", "tracked"]

_ROUND = 1 << 20


def tracked(array: np.ndarray) -> tuple[torch.Tensor, weakref.ref[np.ndarray]]:
    """A tensor over ``array``, and a reference that is dead once nothing views it any more."""
    view = array.view()  # a fresh object whose life is exactly the tensors' over it
    return torch.from_numpy(view), weakref.ref(view)


def _dead() -> None:
    return None


@dataclass(eq=False)
class _Entry:
    base: torch.Tensor
    array: np.ndarray
    handed: Callable[[], object] = _dead  # the view handed out last (alive: still referenced)
    event: Any = None  # torch.cuda.Event of the copy reading this buffer

    def free(self) -> bool:
        if self.handed() is not None:
            return False
        if self.event is not None:
            if not self.event.query():
                return False
            self.event = None
        return True


class BufferPool:
    def __init__(self, max_buffers: int, pin: bool) -> None:
        if max_buffers < 1:
            raise ValueError(f"max_buffers must be >= 1, got {max_buffers}")
        self.max_buffers = max_buffers
        self.pin = pin
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self.allocations = 0  # for tests: how often memory was (pinned and) allocated

    def _allocate(self, nbytes: int) -> _Entry:
        size = max(_ROUND, -(-nbytes // _ROUND) * _ROUND)
        base = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        self.allocations += 1
        return _Entry(base, base.numpy())

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 buffer of exactly ``nbytes`` (a view of a pooled buffer)."""
        with self._lock:
            free = [e for e in self._entries if e.free()]
            fit = min(
                (e for e in free if e.base.numel() >= nbytes),
                key=lambda e: e.base.numel(),
                default=None,
            )
            if fit is None:
                fit = self._allocate(nbytes)
                if len(self._entries) < self.max_buffers:
                    self._entries.append(fit)
                elif free:  # replace a free buffer that is too small
                    self._entries[self._entries.index(free[0])] = fit
                # else: every pooled buffer is held by the caller; this one is not pooled.
            tensor, fit.handed = tracked(fit.array[:nbytes])
            return tensor

    def release_after(self, buffer: torch.Tensor, event: Any) -> None:
        """Mark ``buffer`` busy until ``event`` (a CUDA event) completes."""
        ptr = buffer.data_ptr()
        with self._lock:
            for e in self._entries:
                start = e.base.data_ptr()
                if start <= ptr < start + e.base.numel():
                    e.event = event

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
