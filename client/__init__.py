"""The batchferry client (``batchferry.client``): a DataLoader fed by a loader server."""

from .loader import DataLoader, LoaderConfig
from .stats import LoaderStats

__all__ = ["DataLoader", "LoaderConfig", "LoaderStats"]
