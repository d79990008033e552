"""The batchferry loader server (``batchferry.server``).

Names load on first use, so that ``batchferry.server.config`` (read by
``batchferry health`` in a container probe) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .collate import (
        PackRecipe,
        PadRecipe,
        SlotCollate,
        pack_collate,
        pack_samples,
        pad_collate,
        register_collate,
    )
    from .config import ServerConfig
    from .datasets import dataset_kinds, parse_spec
    from .iterators import ShardInfo, get_shard_info
    from .server import Server
    from .sources import (
        HFDataset,
        ImageFolderDataset,
        MissingDependency,
        MnistDataset,
        NpyDataset,
        ParquetDataset,
        SampleError,
        SyntheticDataset,
        TarShardDataset,
        TokenDataset,
    )

__all__ = [
    "HFDataset",
    "ImageFolderDataset",
    "MissingDependency",
    "MnistDataset",
    "NpyDataset",
    "PackRecipe",
    "PadRecipe",
    "ParquetDataset",
    "SampleError",
    "Server",
    "ServerConfig",
    "ShardInfo",
    "SlotCollate",
    "SyntheticDataset",
    "TarShardDataset",
    "TokenDataset",
    "dataset_kinds",
    "get_shard_info",
    "pack_collate",
    "pack_samples",
    "pad_collate",
    "parse_spec",
    "register_collate",
]

_WHERE = {
    "HFDataset": "sources",
    "ImageFolderDataset": "sources",
    "MissingDependency": "sources",
    "MnistDataset": "sources",
    "NpyDataset": "sources",
    "PackRecipe": "collate",
    "PadRecipe": "collate",
    "ParquetDataset": "sources",
    "SampleError": "sources",
    "Server": "server",
    "ServerConfig": "config",
    "ShardInfo": "iterators",
    "SlotCollate": "collate",
    "SyntheticDataset": "sources",
    "TarShardDataset": "sources",
    "TokenDataset": "sources",
    "dataset_kinds": "datasets",
    "get_shard_info": "iterators",
    "pack_collate": "collate",
    "pack_samples": "collate",
    "pad_collate": "collate",
    "parse_spec": "datasets",
    "register_collate": "collate",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
