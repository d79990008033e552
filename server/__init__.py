"""The batchferry loader server (``batchferry.server``)."""

from .collate import SlotCollate, pad_collate, register_collate
from .datasets import NpyDataset, SyntheticDataset, parse_spec
from .server import Server, ServerConfig

__all__ = [
    "NpyDataset",
    "Server",
    "ServerConfig",
    "SlotCollate",
    "SyntheticDataset",
    "pad_collate",
    "parse_spec",
    "register_collate",
]
