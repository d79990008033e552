"""Host-to-device copies on a side CUDA stream.

Copies are issued ``non_blocking`` from pinned buffers on a dedicated stream as
soon as a batch is assembled, so they overlap the consumer's compute. The batch
is handed over with an event the consumer's stream waits on (no host sync), and
each device tensor is recorded on the consumer's stream so the caching allocator
does not reuse its memory while that stream may still read it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["CudaCopier"]


class CudaCopier:
    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaCopier needs a CUDA device, got {device}")
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available on this machine")
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, tree: Any) -> tuple[Any, torch.cuda.Event]:
        """Issue the copies of every tensor in ``tree``; return the device tree and its event."""
        with torch.cuda.stream(self.stream):
            out = tree_map(
                lambda t: t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor) else t,
                tree,
            )
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def hand_over(self, tree: Any, event: torch.cuda.Event) -> Any:
        """Make the caller's current stream wait for ``event``; return ``tree``."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for leaf in tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                leaf.record_stream(current)
        return tree
