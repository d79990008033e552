"""The batchferry loader server (``batchferry.server``)."""

from .collate import SlotCollate, pad_collate, register_collate
from .config import ServerConfig
from .datasets import NpyDataset, SyntheticDataset, parse_spec
from .server import Server

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
