"""``synthetic:n=N,shape=AxB,dtype=float32,classes=K,seed=S``: deterministic, learnable data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._common import split_options
from ._gather import Gather, take_tensor

__all__ = ["SyntheticDataset", "from_spec"]


class SyntheticDataset:
    """``n`` samples ``(x, label)``: x of ``shape``/``dtype``, label = a fixed linear teacher's argmax.

    Deterministic for a seed, and learnable, so the demo's loss goes down.
    """

    def __init__(
        self,
        n: int = 8192,
        shape: tuple[int, ...] = (32,),
        dtype: torch.dtype = torch.float32,
        classes: int = 10,
        seed: int = 0,
    ) -> None:
        if n < 1 or classes < 1 or any(s < 1 for s in shape):
            raise ValueError(
                f"synthetic dataset needs n, classes and shape >= 1, got {n}, {classes}, {shape}"
            )
        self.n, self.shape, self.dtype, self.classes, self.seed = (
            n,
            tuple(shape),
            dtype,
            classes,
            seed,
        )
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn((n, *self.shape), generator=gen)
        teacher = torch.randn((int(np.prod(self.shape)), classes), generator=gen)
        self.targets = (features.reshape(n, -1) @ teacher).argmax(dim=1)
        if dtype.is_floating_point:
            self.data = features.to(dtype)
        else:
            self.data = (features * 32 + 128).clamp(0, 255).to(dtype)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SyntheticDataset, (self.n, self.shape, self.dtype, self.classes, self.seed))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(self.data[idx], self.targets[idx], strict=True))

    def batch_gatherer(self) -> Gather:
        data, targets = self.data, self.targets
        return lambda idx, w: [take_tensor(data, idx, w), take_tensor(targets, idx, w)]


def from_spec(rest: str) -> SyntheticDataset:
    _, opts = split_options(rest, {"n", "shape", "dtype", "classes", "seed"}, path=False)
    dtype = getattr(torch, opts.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {opts.get('dtype')!r}")
    try:
        n, classes, seed = (int(opts.get(k, d)) for k, d in (("n", 8192), ("classes", 10), ("seed", 0)))
        shape = tuple(int(s) for s in opts.get("shape", "32").split("x"))
    except ValueError as exc:
        raise ValueError(f"n, classes, seed and shape must be integers: {exc}") from None
    return SyntheticDataset(n=n, shape=shape, dtype=dtype, classes=classes, seed=seed)
